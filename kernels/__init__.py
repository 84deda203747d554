"""Kernels of DiT Quant: INT8 W8A8 linear (Triton + plain-torch reference) and their dispatch.

No ComfyUI and no ``quant`` imports here. Triton is optional: without it the reference runs.
"""

from __future__ import annotations

import torch

from .dispatch import as_fp32, available_backends, call_quantize_rows, call_w8a8_linear, resolve_backend
from .dit_fusions import (
    gelu_concat,
    int8_gemm,
    int8_gemm_gated_add,
    layernorm_modulate,
    qk_norm_rope,
    updatable_in_place,
)

__all__ = ["available_backends", "gelu_concat", "int8_gemm", "int8_gemm_gated_add", "layernorm_modulate",
           "qk_norm_rope", "quantize_rows", "resolve_backend", "updatable_in_place", "w8a8_linear"]


def _check_vector(name: str, t: torch.Tensor | None, length: int, what: str) -> None:
    if t is None:
        return
    if not t.is_floating_point():
        raise ValueError(f"DiT Quant: {name} must be a float tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"DiT Quant: {name} must have shape [{length}] ({what}), got {tuple(t.shape)}")


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """INT8 W8A8 linear: per-token dynamic int8 activations times a per-channel int8 weight.

    x: [..., K] bf16/fp16/fp32 (any leading dims, any strides); weight: int8 [N, K] (K contiguous
    is fastest); weight_scale: fp32 [N] (dequantized weight = weight * weight_scale[:, None]);
    bias: [N] float or None; smooth: fp32 [K] SmoothQuant divisor of the activations, or None.
    backend: "auto" | "triton" | "torch". Returns [..., N] in x.dtype.
    """
    if not x.is_floating_point():
        raise ValueError(f"DiT Quant: w8a8_linear input must be a float tensor, got {x.dtype}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"DiT Quant: w8a8_linear weight must be int8 [N, K], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"DiT Quant: w8a8_linear input's last dim {tuple(x.shape)} does not match the "
                         f"weight's K={k} (weight shape [N, K] = {tuple(weight.shape)})")
    _check_vector("weight_scale", weight_scale, n, "one fp32 scale per output channel")
    _check_vector("bias", bias, n, "one value per output channel")
    _check_vector("smooth", smooth, k, "one fp32 divisor per input channel")
    for name, t in (("weight", weight), ("weight_scale", weight_scale), ("bias", bias), ("smooth", smooth)):
        if t is not None and t.device != x.device:
            raise ValueError(f"DiT Quant: w8a8_linear {name} is on {t.device} but the input is on {x.device}")
    return call_w8a8_linear(x, weight, as_fp32(weight_scale), bias, as_fp32(smooth), backend)


def quantize_rows(
    x2d: torch.Tensor, smooth: torch.Tensor | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization of x2d [M, K] (float), optionally divided by smooth fp32 [K].

    Returns (q int8 [M, K], scale fp32 [M]) with x2d / smooth ~= q * scale[:, None].
    """
    if not x2d.is_floating_point() or x2d.dim() != 2:
        raise ValueError(f"DiT Quant: quantize_rows needs a 2-D float tensor, got {x2d.dtype} "
                         f"{tuple(x2d.shape)}")
    _check_vector("smooth", smooth, x2d.shape[1], "one fp32 divisor per input channel")
    return call_quantize_rows(x2d, as_fp32(smooth), backend)
