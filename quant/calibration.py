"""Calibration statistics: per-input-channel absolute maxima of every Linear input, recorded with hooks.

``ActivationStats`` keeps, for each Linear layer (by module path), running maxima only — never the
activations themselves:

* ``absmax[layer]``         fp32 [K]     max |x[..., k]| over every row seen (all timesteps, both CFG halves)
* ``rows[layer]``           int          number of rows (tokens × batch) seen
* ``bucket_absmax[layer]``  fp32 [B, K]  the same maxima per timestep bucket (when ``num_buckets`` > 0)
* ``reservoir[layer]``      fp32 [R, K]  a uniform random sample of at most ``reservoir_rows`` real input rows
  (reservoir sampling, seeded), the proxy input of the per-layer α search in ``smoothquant``. It is kept
  in CPU memory, bounded by R × K × 4 bytes per layer (32 rows of a K=12288 layer: 1.5 MiB).

``ActivationRecorder`` fills an ``ActivationStats`` from forward pre-hooks on a module tree.
Files are safetensors (tensors + a JSON summary in the header metadata), written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_io import atomic_path

STATS_FORMAT = "dit_quant.activation_stats"
STATS_FORMAT_VERSION = 1
METADATA_KEY = "dit_quant_calibration"
_KINDS = ("absmax", "rows", "bucket_absmax", "reservoir")


class CalibrationFileError(ValueError):
    """A calibration file that cannot be read (the message names the file and the problem)."""


def bucket_of_fraction(fraction: float, num_buckets: int) -> int:
    """Timestep bucket of a sampling position: ``fraction`` in [0, 1] (0 = first step, 1 = last) → 0..B-1."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return min(max(int(fraction * num_buckets), 0), num_buckets - 1)


class ActivationStats:
    """Running per-channel input statistics of many Linear layers (see the module docstring).

    ``prompts`` and ``steps_per_prompt`` describe the calibration run and ``settings`` holds any
    JSON-serializable description of it (sampler, cfg, latent size, ...); the recorder does not set them.
    """

    def __init__(self, num_buckets: int = 0, reservoir_rows: int = 0, seed: int = 0) -> None:
        if num_buckets < 0 or reservoir_rows < 0:
            raise ValueError("num_buckets and reservoir_rows must be >= 0")
        self.num_buckets = num_buckets
        self.reservoir_rows = reservoir_rows
        self.seed = seed
        self.absmax: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.bucket_absmax: dict[str, torch.Tensor] = {}
        self.reservoir: dict[str, torch.Tensor] = {}
        self.prompts = 0
        self.steps_per_prompt = 0
        self.settings: dict[str, Any] = {}
        self._generator = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ recording
    def observe(self, layer: str, x: torch.Tensor, bucket: int | None = None) -> None:
        """Folds one Linear input ``x`` [..., K] (any float dtype/device) into the statistics of ``layer``.

        The maxima stay on ``x``'s device until ``to(...)``/``save``, so recording adds no host sync unless
        a reservoir is kept (its sampled rows are copied to the CPU).
        ``bucket`` (0..num_buckets-1) is required when the stats keep timestep buckets.
        """
        if x.ndim == 0 or x.shape[-1] == 0:
            raise ValueError(f"layer {layer}: input of shape {tuple(x.shape)} has no channel dimension")
        x2d = x.detach().reshape(-1, x.shape[-1])
        if x2d.shape[0] == 0:
            return
        amax = x2d.abs().amax(dim=0).float()
        known = self.absmax.get(layer)
        if known is not None and known.shape != amax.shape:
            raise ValueError(
                f"layer {layer}: input has K={amax.shape[0]} channels, earlier inputs had K={known.shape[0]}"
            )
        self.absmax[layer] = amax if known is None else torch.maximum(known, amax.to(known.device))
        if self.num_buckets:
            if bucket is None or not 0 <= bucket < self.num_buckets:
                raise ValueError(
                    f"layer {layer}: bucket {bucket!r} is not in 0..{self.num_buckets - 1}; "
                    "set the recorder's bucket before running the model"
                )
            per_bucket = self.bucket_absmax.get(layer)
            if per_bucket is None:
                per_bucket = torch.zeros(
                    self.num_buckets, amax.shape[0], dtype=torch.float32, device=amax.device
                )
                self.bucket_absmax[layer] = per_bucket
            per_bucket[bucket] = torch.maximum(per_bucket[bucket], amax.to(per_bucket.device))
        if self.reservoir_rows:
            self._sample_rows(layer, x2d)
        self.rows[layer] = self.rows.get(layer, 0) + x2d.shape[0]

    def _sample_rows(self, layer: str, x2d: torch.Tensor) -> None:
        """Reservoir sampling (Algorithm R), vectorized: the row with global index t replaces slot
        j ~ U{0..t} when j < R; when several rows pick one slot the last one wins, as sequentially."""
        capacity, seen, m = self.reservoir_rows, self.rows.get(layer, 0), x2d.shape[0]
        t = torch.arange(seen, seen + m, dtype=torch.float64)
        j = torch.floor(torch.rand(m, generator=self._generator, dtype=torch.float64) * (t + 1)).long()
        slot = torch.where(t < capacity, t.long(), j)
        chosen = torch.nonzero(slot < capacity).flatten()
        if chosen.numel() == 0:
            return
        last = torch.full((capacity,), -1, dtype=torch.long).scatter_reduce_(
            0, slot[chosen], chosen, reduce="amax"
        )
        filled = min(seen + m, capacity)
        reservoir = self.reservoir.get(layer)
        if reservoir is None or reservoir.shape[0] < filled:
            grown = torch.zeros(filled, x2d.shape[1], dtype=torch.float32)
            if reservoir is not None:
                grown[: reservoir.shape[0]] = reservoir
            reservoir = grown
        slots = torch.nonzero(last >= 0).flatten()
        reservoir[slots] = x2d[last[slots].to(x2d.device)].float().cpu()
        self.reservoir[layer] = reservoir

    # ------------------------------------------------------------------ combining
    def layers(self) -> list[str]:
        return sorted(self.absmax)

    def to(self, device: torch.device | str) -> ActivationStats:
        """Moves every tensor to ``device`` in place; returns self."""
        for table in (self.absmax, self.bucket_absmax, self.reservoir):
            for layer, t in table.items():
                table[layer] = t.to(device)
        return self

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Folds ``other`` (e.g. another batch of prompts) into self; returns self.

        Maxima combine by max and row counts add. Reservoirs combine by weighted sampling without
        replacement (Efraimidis–Spirakis; each kept row stands for rows/len(reservoir) rows), so the
        result is again a uniform sample of all rows seen by both.
        """
        if other.num_buckets != self.num_buckets:
            raise ValueError(
                f"cannot merge stats with {other.num_buckets} timestep buckets into stats with "
                f"{self.num_buckets}"
            )
        for layer, amax in other.absmax.items():
            mine = self.absmax.get(layer)
            if mine is not None and mine.shape != amax.shape:
                raise ValueError(
                    f"layer {layer}: K={amax.shape[0]} in the merged stats, K={mine.shape[0]} here"
                )
            if mine is None:
                self.absmax[layer] = amax.clone()
            else:
                self.absmax[layer] = torch.maximum(mine, amax.to(mine.device))
            if layer in other.bucket_absmax:
                theirs = other.bucket_absmax[layer]
                mine_b = self.bucket_absmax.get(layer)
                self.bucket_absmax[layer] = (
                    theirs.clone() if mine_b is None else torch.maximum(mine_b, theirs.to(mine_b.device))
                )
            if self.reservoir_rows and layer in other.reservoir:
                self._merge_reservoir(layer, other.reservoir[layer], other.rows[layer])
            self.rows[layer] = self.rows.get(layer, 0) + other.rows[layer]
        if self.prompts == 0:
            self.steps_per_prompt = other.steps_per_prompt
        elif other.prompts and other.steps_per_prompt != self.steps_per_prompt:
            self.steps_per_prompt = 0  # mixed step counts: unknown
        self.prompts += other.prompts
        for key, value in other.settings.items():
            self.settings.setdefault(key, value)
        return self

    def _merge_reservoir(self, layer: str, theirs: torch.Tensor, their_rows: int) -> None:
        mine = self.reservoir.get(layer)
        if mine is None:
            self.reservoir[layer] = theirs[: self.reservoir_rows].clone()
            return
        weights = torch.cat(
            [
                torch.full((mine.shape[0],), self.rows[layer] / mine.shape[0], dtype=torch.float64),
                torch.full((theirs.shape[0],), their_rows / theirs.shape[0], dtype=torch.float64),
            ]
        )
        keys = torch.rand(weights.shape[0], generator=self._generator, dtype=torch.float64) ** (1.0 / weights)
        keep = torch.topk(keys, min(self.reservoir_rows, weights.shape[0])).indices.sort().values
        both = torch.cat([mine, theirs.to(mine.device)])
        self.reservoir[layer] = both[keep.to(both.device)]

    # ------------------------------------------------------------------ reporting
    def max_ratio(self, layer: str) -> float:
        """Outlier indicator of a layer: largest channel maximum / median channel maximum."""
        amax = self.absmax[layer].float()
        median = amax.median().item()
        return math.inf if median == 0 else amax.max().item() / median

    def summary_dict(self) -> dict[str, Any]:
        """JSON-serializable description: run info, layer count and the layers with the strongest outliers."""
        layers = self.layers()
        maxima = {layer: self.absmax[layer].max().item() for layer in layers}
        by_ratio = sorted(layers, key=self.max_ratio, reverse=True)[:10]
        return {
            "format": STATS_FORMAT,
            "format_version": STATS_FORMAT_VERSION,
            "prompts": self.prompts,
            "steps_per_prompt": self.steps_per_prompt,
            "settings": self.settings,
            "num_buckets": self.num_buckets,
            "reservoir_rows": self.reservoir_rows,
            "seed": self.seed,
            "layers": len(layers),
            "rows_per_layer_max": max(self.rows.values(), default=0),
            "absmax_max": max(maxima.values(), default=0.0),
            "nonfinite_layers": [layer for layer, v in maxima.items() if not math.isfinite(v)],
            "outlier_layers": [
                {"layer": layer, "max": maxima[layer], "max_over_median": self.max_ratio(layer)}
                for layer in by_ratio
            ],
        }

    def summary(self) -> str:
        """Human-readable summary: what was seen, and the layers with the strongest input outlier channels."""
        info = self.summary_dict()
        steps = f" × {info['steps_per_prompt']} steps" if info["steps_per_prompt"] else ""
        lines = [
            f"Calibration: {info['prompts']} prompt(s){steps}, {info['layers']} Linear layers, "
            f"up to {info['rows_per_layer_max']:,} input rows per layer.",
            f"Timestep buckets: {self.num_buckets or 'off'}; reservoir: {self.reservoir_rows} rows/layer.",
            f"Largest input |x| over all layers: {info['absmax_max']:.4g}.",
        ]
        if info["nonfinite_layers"]:
            lines.append(
                f"WARNING: non-finite inputs in {len(info['nonfinite_layers'])} layer(s): "
                + ", ".join(info["nonfinite_layers"][:5])
            )
        if info["outlier_layers"]:
            lines.append("Strongest outlier channels (max / median of the per-channel maxima):")
            width = max(len(row["layer"]) for row in info["outlier_layers"])
            for row in info["outlier_layers"]:
                ratio = row["max_over_median"]
                lines.append(f"  {row['layer']:<{width}}  max {row['max']:>10.4g}  ratio {ratio:>8.1f}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Writes the statistics to a safetensors file atomically (tensors on CPU, summary in the header)."""
        tensors: dict[str, torch.Tensor] = {}
        for layer in self.layers():
            tensors[f"absmax/{layer}"] = self.absmax[layer].detach().float().cpu().contiguous()
            tensors[f"rows/{layer}"] = torch.tensor([self.rows[layer]], dtype=torch.int64)
            if layer in self.bucket_absmax:
                tensors[f"bucket_absmax/{layer}"] = (
                    self.bucket_absmax[layer].detach().float().cpu().contiguous()
                )
            if layer in self.reservoir:
                tensors[f"reservoir/{layer}"] = self.reservoir[layer].detach().float().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(self.summary_dict())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationStats:
        """Reads a file written by ``save``; raises CalibrationFileError naming the file and the problem."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CalibrationFileError(f"{path}: not a readable safetensors file ({e})") from e
        if METADATA_KEY not in metadata:
            raise CalibrationFileError(
                f"{path}: no {METADATA_KEY} metadata; not a DiT Quant calibration file"
            )
        try:
            info = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise CalibrationFileError(f"{path}: the {METADATA_KEY} header is not valid JSON ({e})") from e
        if info.get("format") != STATS_FORMAT:
            raise CalibrationFileError(f"{path}: format {info.get('format')!r} is not {STATS_FORMAT!r}")
        if int(info.get("format_version", 0)) > STATS_FORMAT_VERSION:
            raise CalibrationFileError(
                f"{path}: format version {info['format_version']} is newer than this pack "
                f"understands ({STATS_FORMAT_VERSION}); update DiT Quant"
            )
        stats = cls(int(info["num_buckets"]), int(info["reservoir_rows"]), int(info.get("seed", 0)))
        stats.prompts = int(info.get("prompts", 0))
        stats.steps_per_prompt = int(info.get("steps_per_prompt", 0))
        stats.settings = dict(info.get("settings", {}))
        for key, tensor in tensors.items():
            kind, sep, layer = key.partition("/")
            if not sep or kind not in _KINDS:
                raise CalibrationFileError(f"{path}: unexpected tensor {key!r}")
            if kind == "rows":
                stats.rows[layer] = int(tensor.reshape(-1)[0])
            else:
                getattr(stats, kind)[layer] = tensor
        stats._validate(str(path))
        return stats

    def _validate(self, where: str) -> None:
        for table_name in ("rows", "bucket_absmax", "reservoir"):
            for layer in getattr(self, table_name):
                if layer not in self.absmax:
                    raise CalibrationFileError(f"{where}: {table_name}/{layer} has no absmax/{layer} tensor")
        for layer, amax in self.absmax.items():
            if amax.dtype != torch.float32 or amax.ndim != 1:
                raise CalibrationFileError(
                    f"{where}: absmax/{layer} must be fp32 [K], got {amax.dtype} {tuple(amax.shape)}"
                )
            if layer not in self.rows:
                raise CalibrationFileError(f"{where}: layer {layer} lacks its rows/{layer} count")
            k = amax.shape[0]
            per_bucket = self.bucket_absmax.get(layer)
            if self.num_buckets and (per_bucket is None or tuple(per_bucket.shape) != (self.num_buckets, k)):
                raise CalibrationFileError(
                    f"{where}: bucket_absmax/{layer} must be fp32 [{self.num_buckets}, {k}], "
                    f"got {None if per_bucket is None else tuple(per_bucket.shape)}"
                )
            sample = self.reservoir.get(layer)
            if sample is not None and (
                sample.ndim != 2 or sample.shape[1] != k or sample.shape[0] > self.reservoir_rows
            ):
                raise CalibrationFileError(
                    f"{where}: reservoir/{layer} must be fp32 [<= {self.reservoir_rows}, {k}], "
                    f"got {tuple(sample.shape)}"
                )


def _linear_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    return x if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def linear_like_modules(root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every Linear-like layer: torch Linear subclasses and anything with ``in_features``
    (such as ``Int8Linear``)."""
    for name, module in root.named_modules():
        if name and (isinstance(module, torch.nn.Linear) or hasattr(module, "in_features")):
            yield name, module


class ActivationRecorder:
    """Context manager recording the input statistics of every Linear-like layer under ``root``.

    Layer names are module paths relative to ``root`` (pass the diffusion model to get ComfyUI
    state-dict names such as ``double_blocks.0.img_attn.qkv``). Set ``recorder.bucket`` before each
    model call when the stats keep timestep buckets.
    """

    def __init__(self, root: torch.nn.Module, stats: ActivationStats | None = None) -> None:
        self.root = root
        self.stats = stats if stats is not None else ActivationStats()
        self.bucket: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationRecorder:
        if self._handles:
            raise RuntimeError("ActivationRecorder is already active")
        for name, module in linear_like_modules(self.root):
            self._handles.append(module.register_forward_pre_hook(self._hook_for(name), with_kwargs=True))
        return self

    def _hook_for(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = _linear_input(args, kwargs)
            if x is not None:
                self.stats.observe(name, x, self.bucket)

        return hook

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def layer_count(self) -> int:
        """Number of hooked layers while active."""
        return len(self._handles)
