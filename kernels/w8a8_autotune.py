"""Config choice for the Triton W8A8 GEMM: autotuned per (GPU, M bucket, N, K, flags), cached on disk.

The cache is a JSON file, by default ``~/.cache/dit_quant/w8a8_autotune.json`` (``$XDG_CACHE_HOME`` is
honoured); ``DIT_QUANT_AUTOTUNE_CACHE`` names another file. ``DIT_QUANT_AUTOTUNE=0`` turns tuning off
(the architecture's default config runs). M is bucketed to the next power of two so a new image size
does not re-tune. Tuning never runs while a CUDA graph is being captured (the default config is used
for that call and nothing is cached), so captured graphs launch no benchmark work.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import torch
import triton

from .w8a8_triton import (
    INTERPRETED,
    INTERPRETER_CONFIGS,
    SMALL_M_MAX,
    GemmConfig,
    arch_key,
    candidate_configs,
    tma_compatible,
    w8a8_linear_triton,
)

logger = logging.getLogger("dit_quant.kernels")

_KEY_VERSION = "v1"  # bump when GemmConfig or the kernels change meaning
_lock = threading.Lock()
_memory_cache: dict[str, GemmConfig] | None = None


def cache_path() -> Path:
    """Path of the on-disk autotune cache (JSON)."""
    override = os.environ.get("DIT_QUANT_AUTOTUNE_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dit_quant" / "w8a8_autotune.json"


def m_bucket(m: int) -> int:
    """Rows -> tuning bucket: the next power of two (1, 2, 4, ..., capped at 16384)."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


def _load_disk_cache() -> dict[str, GemmConfig]:
    path = cache_path()
    try:
        raw = json.loads(path.read_text())
        return {key: GemmConfig(**fields) for key, fields in raw.items() if key.startswith(_KEY_VERSION)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("DiT Quant: ignoring unreadable autotune cache %s (%s)", path, exc)
        return {}


def _save_disk_cache(entries: dict[str, GemmConfig]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({key: asdict(cfg) for key, cfg in sorted(entries.items())}, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("DiT Quant: could not write autotune cache %s (%s)", path, exc)


def _tuning_key(x2d: torch.Tensor, n: int, k: int, has_bias: bool, has_smooth: bool) -> str:
    props = torch.cuda.get_device_properties(x2d.device)
    return (f"{_KEY_VERSION}|{props.name}|sm{props.major}{props.minor}|triton{triton.__version__}"
            f"|m{m_bucket(x2d.shape[0])}|n{n}|k{k}|{str(x2d.dtype).removeprefix('torch.')}|bias{int(has_bias)}|smooth{int(has_smooth)}")


def _tune(candidates: list[GemmConfig], args: tuple) -> GemmConfig:
    best, best_ms = candidates[0], float("inf")
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda c=config: w8a8_linear_triton(*args, c), warmup=5, rep=20)
        except Exception as exc:  # a config the compiler or the GPU rejects is skipped, not fatal
            logger.debug("DiT Quant: W8A8 config %s failed while tuning: %s", config, exc)
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def choose_config(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
) -> GemmConfig:
    """Config for one call: the interpreter's fixed one, a cached tuned one, or tune now (GPU)."""
    global _memory_cache
    small_m = x2d.shape[0] <= SMALL_M_MAX
    if INTERPRETED or x2d.device.type != "cuda":
        return INTERPRETER_CONFIGS[small_m]
    candidates = candidate_configs(arch_key(torch.cuda.get_device_capability(x2d.device)), small_m)
    if not tma_compatible(weight, x2d.dtype):
        candidates = [c for c in candidates if c.kind != "tma"]
    if os.environ.get("DIT_QUANT_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    n, k = weight.shape
    key = _tuning_key(x2d, n, k, bias is not None, smooth is not None)
    with _lock:
        if _memory_cache is None:
            _memory_cache = _load_disk_cache()
        cached = _memory_cache.get(key)
    if cached is not None:
        return cached
    best = _tune(candidates, (x2d, weight, weight_scale, bias, smooth))
    logger.info("DiT Quant: tuned W8A8 GEMM %s -> %s", key, best)
    with _lock:
        _memory_cache[key] = best
        merged = {**_load_disk_cache(), **_memory_cache}
        _save_disk_cache(merged)
    return best
