"""LoRA as a side branch of a quantized Linear: y = base(x) + Σ_i scale_i · (x · down_iᵀ) · up_iᵀ.

Merging a LoRA into an INT8 or GGUF weight means dequantizing, adding and re-quantizing it (lossy, and
the base weights change with every strength). Keeping the low-rank update beside the layer instead
leaves the quantized weight untouched and costs two thin GEMMs per call: the downs of every stacked LoRA
are concatenated into one [R, K] matrix and the ups, with each term's scale folded in, into one [N, R]
matrix. The result equals the merged float weight (W + Σ scale_i · up_i · down_i) applied to x, up to
the rounding of the compute dtype.

The branch sees the layer's input x as the model computes it. For an ``Int8Linear`` with a SmoothQuant
vector s, x arrives un-smoothed (the kernel divides by s inside activation quantization), so the LoRA,
trained on the original weight, applies to x unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankTerm:
    """One LoRA's update of one Linear weight [N, K]: ``scale · up · (mid ·) down``.

    down: [r, K]; up: [rows, r'] with r' = r, or r' = mid's output rank when ``mid`` [r', r] (or
    [r', r, 1, 1], LoCon's middle factor) is given; scale: strength · alpha / rank (unitless).
    rows: (start, length) of the output rows the update covers (a ComfyUI patch on one part of a fused
    weight, e.g. the q of qkv), or None for all N rows (then rows = N).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    mid: torch.Tensor | None = None
    rows: tuple[int, int] | None = None

    def effective_down(self) -> torch.Tensor:
        """The down matrix with ``mid`` folded in, in float32: [r', K]."""
        down = self.down.float()
        if self.mid is None:
            return down
        mid = self.mid.float()
        if mid.ndim == 4 and mid.shape[2:] == (1, 1):
            mid = mid[:, :, 0, 0]
        if mid.ndim != 2 or mid.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA mid {tuple(self.mid.shape)} does not fit down {tuple(self.down.shape)}")
        return mid @ down


class LowRankBranch:
    """The stacked LoRA terms of one Linear [N, K] as two matrices.

    ``down`` [R, K] and ``up`` [N, R] (R = sum of the ranks; each term's scale folded into its columns
    of ``up``, rows outside its ``rows`` slice zero), both in ``dtype`` on ``device``.
    """

    def __init__(
        self,
        terms: Sequence[LowRankTerm],
        out_features: int,
        in_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not terms:
            raise ValueError("a LoRA branch needs at least one term")
        downs, ups = [], []
        for term in terms:
            down = term.effective_down()
            start, length = term.rows if term.rows is not None else (0, out_features)
            if down.ndim != 2 or down.shape[1] != in_features:
                raise ValueError(f"LoRA down {tuple(term.down.shape)} does not match K={in_features}")
            if term.up.shape != (length, down.shape[0]) or start < 0 or start + length > out_features:
                raise ValueError(
                    f"LoRA up {tuple(term.up.shape)} does not match rows {start}..{start + length} "
                    f"of N={out_features} and rank {down.shape[0]}"
                )
            up = torch.zeros(out_features, down.shape[0], dtype=torch.float32, device=down.device)
            up[start : start + length] = term.up.float().to(down.device) * term.scale
            downs.append(down)
            ups.append(up)
        self.down = torch.cat(downs).to(device=device, dtype=dtype)
        self.up = torch.cat(ups, dim=1).to(device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.down.device

    def to(self, device: torch.device | str) -> LowRankBranch:
        """Moves both matrices to ``device`` (in place; returns self)."""
        self.down, self.up = self.down.to(device), self.up.to(device)
        return self

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] + (x [..., K] · downᵀ) · upᵀ, computed in y's dtype on x's device.

        The matrices are cast per call where they are not already there (an offloaded layer's branch
        travels with its weight); y is updated in place when it is contiguous.
        """
        down = self.down.to(x.device, y.dtype)
        up = self.up.to(x.device, y.dtype)
        hidden = x.reshape(-1, x.shape[-1]).to(y.dtype) @ down.t()
        out = y.reshape(-1, y.shape[-1])
        return out.addmm_(hidden, up.t()).view(y.shape)
