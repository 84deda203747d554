"""Config choice for the Triton W8A8 GEMM: autotuned per (GPU, M bucket, N, K, flags), cached on disk.

The cache is a JSON file, by default ``~/.cache/dit_quant/w8a8_autotune.json`` (``$XDG_CACHE_HOME`` is
honoured); ``DIT_QUANT_AUTOTUNE_CACHE`` names another file. ``DIT_QUANT_AUTOTUNE=0`` turns tuning off
(the architecture's default config runs). M is bucketed to the next power of two so a new image size
does not re-tune. Candidates are timed as CUDA-graph replays (GPU time, not Python launch cost), since
in a model's forward the host runs ahead of the GPU, with L2 flushed before each (weights come from
DRAM). Tuning never runs while a CUDA graph is being captured (the default config serves that call and
nothing is cached), so captured graphs contain no benchmark work. After the first call for a shape, the
lookup is one dict access.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import triton

from .triton_launch import next_power_of_2
from .w8a8_triton import (
    GEMV_MAX_M,
    INTERPRETED,
    INTERPRETER_CONFIGS,
    ONE_LAUNCH_KINDS,
    GemmConfig,
    arch_key,
    candidate_configs,
    int8_gemm_triton,
    m_regime,
    program_slots,
    tail_start_row,
    tma_compatible,
    w8a8_linear_triton,
)

logger = logging.getLogger("dit_quant.kernels")

_KEY_VERSION = "v6"  # bump when GemmConfig or the kernels change meaning
_lock = threading.Lock()
_disk_entries: dict[str, GemmConfig] | None = None
_chosen: dict[tuple, GemmConfig] = {}  # fast path: call signature -> config


def cache_path() -> Path:
    """Path of the on-disk autotune cache (JSON)."""
    override = os.environ.get("DIT_QUANT_AUTOTUNE_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dit_quant" / "w8a8_autotune.json"


def m_bucket(m: int) -> int:
    """Rows -> tuning bucket: the next power of two (1, 2, 4, ..., capped at 16384)."""
    return min(next_power_of_2(max(m, 1)), 16384)


def _load_disk_cache() -> dict[str, GemmConfig]:
    path = cache_path()
    try:
        raw = json.loads(path.read_text())
        return {key: GemmConfig.from_dict(cfg) for key, cfg in raw.items() if key.startswith(_KEY_VERSION)}
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


def _disk_key(device: torch.device, bucket: int, weight_shape: torch.Size, dtype: torch.dtype, has_bias: bool,
              has_smooth: bool, tma_ok: bool, prequantized: bool) -> str:
    props = torch.cuda.get_device_properties(device)
    n, k = weight_shape
    # "gemm" entries time the GEMM alone (activations quantized by a fused producer), others the whole linear
    return (f"{_KEY_VERSION}|{props.name}|sm{props.major}{props.minor}|triton{triton.__version__}|m{bucket}"
            f"|n{n}|k{k}|{str(dtype).removeprefix('torch.')}|bias{int(has_bias)}|smooth{int(has_smooth)}"
            f"|tma{int(tma_ok)}{'|gemm' if prequantized else ''}")


def gpu_time_ms(fn, rep_ms: int = 20) -> float:
    """Median GPU milliseconds of fn, replayed from a CUDA graph (no Python launch cost) with the L2 cache
    flushed before each replay: in a model's forward a layer's weights come from DRAM, while back-to-back
    replays would find a small layer's weights in L2 and favour other tiles. Falls back to eager timing
    where fn cannot be captured, and to replays without the flush where its buffer (256 MB) does not fit
    beside the model."""
    # not at the top: cuda_graphs imports dispatch, which imports us
    from .cuda_graphs import graph_of
    from .dispatch import log_once

    try:
        replay = graph_of(fn).replay
    except RuntimeError:
        replay = fn
    try:
        return triton.testing.do_bench(replay, warmup=5, rep=rep_ms, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        log_once("autotune without L2 flush", "DiT Quant: no GPU memory for the L2 flush while tuning the "
                 "W8A8 GEMM; timing without it (small layers may get other tiles)", logging.WARNING)
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


FINALISTS = 3  # candidates timed a second time, longer, before one is chosen


def _tune(candidates: list[GemmConfig], run: Callable[[GemmConfig], torch.Tensor]) -> GemmConfig | None:
    """The fastest candidate on GPU time: every candidate timed briefly, then the FINALISTS fastest
    again, longer, and the best of those second timings wins (one short timing of a sub-millisecond GEMM
    moves by a few percent, as much as the finalists differ). None where no candidate could be timed."""
    timings: dict[GemmConfig, float] = {}
    for config in candidates:
        try:
            run(config)  # compile outside any timing / capture
            timings[config] = gpu_time_ms(lambda c=config: run(c))
        except Exception as exc:  # a config the compiler or the GPU rejects is skipped, not fatal
            logger.debug("DiT Quant: W8A8 config %s failed while tuning: %s", config, exc)
    if not timings:
        return None
    finalists = {config: gpu_time_ms(lambda c=config: run(c), rep_ms=60)
                 for config in sorted(timings, key=timings.get)[:FINALISTS]}
    return min(finalists, key=finalists.get)


def applicable_configs(candidates: list[GemmConfig], m: int, n: int, tma_ok: bool, prequantized: bool,
                       slots: int) -> list[GemmConfig]:
    """The candidates that can run, and differ from the others, for M rows and N output columns:
    "tma" only where ``tma_ok``; no one-launch kind for activations already quantized (``prequantized``);
    "gemv" only up to GEMV_MAX_M rows; a tail only where it splits the rows (one that would run nothing,
    or everything, repeats another candidate). ``slots``: programs that run at once."""
    return [c for c in candidates
            if (tma_ok or all(part.kind != "tma" for part in c.launches()))
            and not (prequantized and c.kind in ONE_LAUNCH_KINDS)
            and (c.kind != "gemv" or m <= GEMV_MAX_M)
            and (c.tail is None or tail_start_row(m, n, c, slots) not in (0, m))]


def _choose(
    device: torch.device,
    m: int,
    weight: torch.Tensor,
    dtype: torch.dtype,
    has_bias: bool,
    has_smooth: bool,
    prequantized: bool,
    run: Callable[[GemmConfig], torch.Tensor],
) -> GemmConfig:
    global _disk_entries
    if INTERPRETED or device.type != "cuda":
        return INTERPRETER_CONFIGS[m_regime(m)]
    # Everything tma_compatible() reads, so that a hit costs no more than building this tuple.
    signature = (device.index, m_bucket(m), weight.shape, weight.stride(0), weight.data_ptr() % 16, dtype,
                 has_bias, has_smooth, prequantized)
    config = _chosen.get(signature)
    if config is not None:
        return config
    tma_ok = tma_compatible(weight, dtype)
    candidates = applicable_configs(candidate_configs(arch_key(torch.cuda.get_device_capability(device)),
                                                      m_regime(m)),
                                    m, weight.shape[0], tma_ok, prequantized, program_slots(device))
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    if os.environ.get("DIT_QUANT_AUTOTUNE", "1") == "0":
        _chosen[signature] = candidates[0]
        return candidates[0]
    disk_key = _disk_key(device, m_bucket(m), weight.shape, dtype, has_bias, has_smooth, tma_ok, prequantized)
    with _lock:
        if _disk_entries is None:
            _disk_entries = _load_disk_cache()
        config = _disk_entries.get(disk_key)
    if config is None:
        config = _tune(candidates, run)
        if config is None:  # e.g. out of memory while timing: serve the default, keep nothing on disk
            logger.warning("DiT Quant: no W8A8 GEMM config could be timed for %s; using the default %s "
                           "in this session", disk_key, candidates[0])
            _chosen[signature] = candidates[0]
            return candidates[0]
        logger.info("DiT Quant: tuned W8A8 GEMM %s -> %s", disk_key, config)
        with _lock:
            _disk_entries[disk_key] = config
            _save_disk_cache({**_load_disk_cache(), **_disk_entries})
    _chosen[signature] = config
    return config


def choose_config(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
) -> GemmConfig:
    """Config of the whole W8A8 linear for one call: the interpreter's fixed one, a cached tuned one, or
    tune now (GPU)."""
    return _choose(x2d.device, x2d.shape[0], weight, x2d.dtype, bias is not None, smooth is not None, False,
                   lambda c: w8a8_linear_triton(x2d, weight, weight_scale, bias, smooth, c))


def choose_gemm_config(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> GemmConfig:
    """Config of the GEMM alone (``int8_gemm_triton``, activations already quantized), chosen like
    ``choose_config``."""
    return _choose(q.device, q.shape[0], weight, out_dtype, bias is not None, False, True,
                   lambda c: int8_gemm_triton(q, scale, weight, weight_scale, bias, out_dtype, c))
