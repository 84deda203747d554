"""Dispatch of GGUF dequantization and GGUF linear layers to Triton or the plain-torch reference.

- ``gguf_dequantize``: Triton kernel on CUDA GPUs of compute capability >= 8.0 for the types it covers,
  else the torch reference (on the tensor's own device).
- ``gguf_linear``: the fused dequantize-and-multiply kernel on such GPUs (``mode="fused"``, and ``"auto"``
  where it is measured to be faster: few rows, wide weights);
  ``mode="int8"`` runs Q8_0 weights on INT8 tensor cores with per-token activation quantization;
  ``mode="dequant"`` dequantizes the weight (Triton where possible) and calls ``F.linear``;
  ``mode="torch"`` does the same with the plain-torch dequantizer (what the common ComfyUI loader does).
  Everything else (CPU, older GPUs, types without a kernel, K not a multiple of 256) takes the dequant path.

A Triton failure under "auto" (compile or launch) makes that device use the torch path from then on,
with one warning. The interpreter (TRITON_INTERPRET=1) is never picked automatically: tests call the
Triton entry points directly.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from .dispatch import log_once, triton_unavailable
from .gguf_dequant_reference import dequantize_reference

MODES = ("auto", "fused", "int8", "dequant", "torch")

try:
    from .gguf_dequant_triton import INTERPRETED, TRITON_TYPES, dequantize_triton
    from .gguf_matmul_triton import FUSED_TYPES, K_MULTIPLE, gguf_linear_fused, gguf_linear_int8_q8_0

    _TRITON_ERROR: str | None = None
except ImportError as exc:  # Triton is optional
    TRITON_TYPES = FUSED_TYPES = ()
    INTERPRETED = False
    K_MULTIPLE = {}
    _TRITON_ERROR = str(exc)

_lock = threading.Lock()
_failed_devices: set[str] = set()


_usable: dict[torch.device, bool] = {}  # per device, after the first call (dropped when a kernel fails)


def triton_usable(device: torch.device) -> bool:
    """True if the GGUF Triton kernels run natively on ``device`` (CUDA, sm_80+, Triton importable); when
    not, logs once per device why the plain-torch path runs."""
    usable = _usable.get(device)
    if usable is None:
        reason = triton_unavailable(device, _TRITON_ERROR, INTERPRETED, _failed_devices, "GGUF")
        if reason is not None:
            log_once(f"gguf torch:{device}",
                     f"DiT Quant: GGUF layers on {device} use the plain-torch dequantization path: {reason}")
        usable = _usable[device] = reason is None
    return usable


def _note_failure(device: torch.device, exc: Exception) -> None:
    with _lock:
        _failed_devices.add(str(device))
        _usable.pop(device, None)
    log_once(
        f"gguf fail:{device}",
        f"DiT Quant: a GGUF Triton kernel failed on {device} "
        f"({type(exc).__name__}: {exc}); using the torch path on this device from now on",
        logging.WARNING,
    )


def gguf_dequantize(
    raw: torch.Tensor, qtype: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """GGUF bytes (uint8, on any device) -> tensor of ``shape`` in ``dtype`` on the same device."""
    if qtype in TRITON_TYPES and triton_usable(raw.device):
        try:
            return dequantize_triton(raw, qtype, shape, dtype)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # compile/launch failure: fall back for good on this device
            _note_failure(raw.device, exc)
    return dequantize_reference(raw, qtype, shape, dtype)


# Where the fused kernel beat Triton dequantization + cuBLAS on the H100 (bench/results/bench_gguf.md): only
# for a few rows and a wide weight (N >= 3K for K-quants, N >= 4K for the 32-value block types: Q8_0 lost
# at N = 3K). With many rows it decodes every weight tile once per row tile and loses to cuBLAS; with a
# narrow weight it has too few column tiles to fill the GPU (no split-K).
FUSED_MAX_ROWS = 16


def fused_wins(m: int, n: int, k: int, qtype: str) -> bool:
    """True if ``mode="auto"`` runs the fused kernel for M rows, a ``qtype`` weight [N, K] (else dequant +
    cuBLAS)."""
    return m <= FUSED_MAX_ROWS and n >= (3 if qtype.endswith("_K") else 4) * k


def gguf_linear(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: str,
    weight_shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """``x [..., K] @ dequant(W).T + bias`` for a GGUF weight W of ``weight_shape`` [N, K] held as raw bytes.

    Returns [..., N] in x.dtype. ``mode``: "auto" (the fused kernel where it is the faster path, see
    ``fused_wins``, else "dequant"), "fused", "int8" (Q8_0 on
    INT8 tensor cores where possible), "dequant" (dequantize then ``F.linear``) or "torch" (the same with
    the plain-torch dequantizer).
    """
    if mode not in MODES:
        raise ValueError(f"DiT Quant: unknown GGUF linear mode {mode!r}; expected one of {MODES}")
    n, k = weight_shape
    if bias is not None:
        bias = bias.to(device=x.device, dtype=x.dtype)
    if mode == "auto" and not fused_wins(x.numel() // k, n, k, qtype):
        mode = "dequant"
    if (
        mode not in ("dequant", "torch")
        and qtype in FUSED_TYPES
        and k % K_MULTIPLE[qtype] == 0
        and triton_usable(x.device)
    ):
        x2d = x.reshape(-1, k)
        try:
            if mode == "int8" and qtype == "Q8_0":
                from . import quantize_rows  # the W8A8 kernels' per-token quantizer (makes K contiguous)

                xq, x_scale = quantize_rows(x2d)
                out = gguf_linear_int8_q8_0(xq, x_scale, raw, n, k, bias, x.dtype)
            else:
                out = gguf_linear_fused(x2d, raw, qtype, n, k, bias)
            return out.view(*x.shape[:-1], n)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            if mode != "auto":
                raise
            _note_failure(x.device, exc)
    if mode == "torch":
        weight = dequantize_reference(raw, qtype, (n, k), x.dtype)
    else:
        weight = gguf_dequantize(raw, qtype, (n, k), x.dtype)
    return F.linear(x, weight, bias)
