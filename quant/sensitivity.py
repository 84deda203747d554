"""Quantization sensitivity: the error each layer (or block) alone causes on the denoiser output.

The caller passes in how to run the denoiser on fixed calibration inputs and how to quantize one unit
temporarily, so this module needs no ComfyUI. Each unit is quantized alone, the outputs are compared
with the unquantized reference, and the units are ranked by relative error.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .charts import bar_chart
from .protection import protection_for_budget

Outputs = torch.Tensor | Sequence[torch.Tensor]

# A transformer block is the name prefix up to "<...>blocks.N", "layers.N" or "<...>refiner.N".
_BLOCK = re.compile(r"^(.*?(blocks|layers|refiner)\.\d+)\.")


def block_of(layer: str) -> str:
    """The transformer block a layer belongs to (e.g. ``double_blocks.3``), or the layer itself."""
    match = _BLOCK.match(layer)
    return match.group(1) if match else layer


def group_by_block(layers: Iterable[str]) -> dict[str, list[str]]:
    """{block: [its layers]} in first-seen order; layers outside blocks form their own unit."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(block_of(layer), []).append(layer)
    return groups


def _as_list(outputs: Outputs) -> list[torch.Tensor]:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def relative_error(outputs: Outputs, reference: Outputs) -> float:
    """sqrt(Σ‖out − ref‖² / Σ‖ref‖²) over matching tensors, in float64."""
    outs, refs = _as_list(outputs), _as_list(reference)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs, strict=True)):
        raise ValueError("denoiser outputs do not match the reference outputs in number or shape")
    num = sum(
        ((o.double() - r.double().to(o.device)) ** 2).sum().item() for o, r in zip(outs, refs, strict=True)
    )
    den = sum((r.double() ** 2).sum().item() for r in refs)
    return math.sqrt(num / den) if den > 0 else math.inf


@dataclass
class SensitivityRow:
    name: str
    params: int
    relative_error: float


@dataclass
class SensitivityReport:
    """Units ranked most sensitive first; ``members`` maps each unit to the layers it stands for."""

    rows: list[SensitivityRow]
    unit: str
    members: dict[str, list[str]] = field(default_factory=dict)

    def ranked_names(self) -> list[str]:
        return [row.name for row in self.rows]

    def protection_for_budget(self, fraction: float) -> list[str]:
        """Layers to keep in high precision: the worst units within ``fraction`` of all their parameters."""
        units = protection_for_budget(self.ranked_names(), {r.name: r.params for r in self.rows}, fraction)
        return [layer for unit in units for layer in self.members.get(unit, [unit])]

    def table(self, top: int | None = None) -> str:
        """Text table: rank, unit, parameters, relative error of the denoiser output."""
        rows = self.rows if top is None else self.rows[:top]
        width = max([len(r.name) for r in rows] + [len(self.unit)])
        lines = [f"{'#':>3}  {self.unit:<{width}}  {'params':>12}  {'rel. error':>10}"]
        lines += [
            f"{i + 1:>3}  {r.name:<{width}}  {r.params:>12,}  {r.relative_error:>10.3e}"
            for i, r in enumerate(rows)
        ]
        if top is not None and len(self.rows) > top:
            lines.append(f"... {len(self.rows) - top} more")
        return "\n".join(lines)

    def chart(self, top: int = 30) -> torch.Tensor:
        """Bar chart of the ``top`` most sensitive units → IMAGE tensor [1, H, W, 3] in [0, 1]."""
        rows = self.rows[:top]
        return bar_chart(
            [r.name for r in rows],
            [r.relative_error for r in rows],
            f"Denoiser output error when only this {self.unit} is INT8 (top {len(rows)})",
            value_format="{:.2e}",
        )

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "rows": [vars(r) for r in self.rows], "members": self.members}


def measure_sensitivity(
    units: Mapping[str, Sequence[str]],
    param_counts: Mapping[str, int],
    run_denoiser: Callable[[], Outputs],
    quantize_only: Callable[[Sequence[str]], contextlib.AbstractContextManager],
    unit: str = "layer",
    progress: Callable[[int, int], None] | None = None,
) -> SensitivityReport:
    """Ranks ``units`` ({unit name: its layers}) by the error quantizing only that unit causes.

    run_denoiser(): runs the denoiser on fixed calibration inputs (same noise, timesteps, conditioning
    every call) and returns its output tensor(s). quantize_only(layers): a context manager within which
    exactly those layers are quantized. param_counts: parameters per layer.
    """
    reference = [t.detach().clone() for t in _as_list(run_denoiser())]
    rows = []
    for i, (name, layers) in enumerate(units.items()):
        with quantize_only(layers):
            error = relative_error(run_denoiser(), reference)
        rows.append(SensitivityRow(name, sum(param_counts[layer] for layer in layers), error))
        if progress is not None:
            progress(i + 1, len(units))
    rows.sort(key=lambda r: r.relative_error, reverse=True)
    return SensitivityReport(rows, unit, {name: list(layers) for name, layers in units.items()})
