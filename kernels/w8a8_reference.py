"""Plain-torch reference of the INT8 W8A8 linear: the exact math every backend must reproduce.

Math (all backends):
    xs    = x.float() / smooth                      (smooth optional, fp32 [K])
    scale = max(max|xs| over the row, 1e-12) / 127  (fp32, one per row/token)
    q     = clamp(round_half_even(xs / scale), -127, 127) -> int8
    acc   = q @ weight.T                            (int32, exact)
    out   = acc.float() * scale[:, None] * weight_scale[None, :] (+ bias.float())  -> x.dtype
Gated add (``int8_gemm_gated_add``, on quantized rows): residual += (out_fp32 * gate[sample]) -> dtype

The integer product is computed exactly: ``torch._int_mm`` (int32 accumulation) where the device and
shape allow it, otherwise a float32 matmul over K chunks of at most 1024. Each chunk is exact because
int8 values are exact in fp32/tf32 and a chunk's partial sums stay below 1024 * 127 * 127 < 2**24;
the chunk results are then summed in int32.
"""

from __future__ import annotations

import torch

QMAX = 127.0
SCALE_FLOOR = 1e-12
_EXACT_FP32_CHUNK = 1024  # 1024 * 127 * 127 = 16_516_096 < 2**24

# Devices on which torch._int_mm raised once; they use the chunked fp32 path from then on.
_int_mm_failed_devices: set[str] = set()


def quantize_rows_reference(
    x2d: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of a 2-D activation.

    x2d: [M, K] float (any float dtype); smooth: fp32 [K] divisor or None.
    Returns (q int8 [M, K], scale fp32 [M]) with x2d / smooth ~= q * scale[:, None].
    """
    xs = x2d.float()
    if smooth is not None:
        xs = xs / smooth.float()
    amax = xs.abs().amax(dim=1).clamp_min(SCALE_FLOOR)
    # A true division: torch on CUDA turns division by a Python scalar into a multiplication by its
    # reciprocal, which differs by one ulp for some values and would flip rounding ties downstream.
    scale = amax / torch.full_like(amax, QMAX)
    # Multiply by the row's IEEE reciprocal instead of dividing every element: the Triton kernel does the
    # same (an fp32 division per element made it 1.4-1.6x slower on the H100, bench_quantize_rows.md).
    inverse = torch.ones_like(scale) / scale
    q = torch.round(xs * inverse[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _int_mm_exact(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """torch._int_mm with the CUDA shape rules met by zero padding (M > 16, K and N multiples of 8)."""
    m, k = q.shape
    n = weight.shape[0]
    if q.device.type != "cuda":
        return torch._int_mm(q, weight.t())
    m_pad, k_pad, n_pad = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    acc = torch._int_mm(_pad_to(q, m_pad, k_pad), _pad_to(weight, n_pad, k_pad).t())
    return acc[:m, :n]


def _chunked_fp32_exact(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(q.shape[0], weight.shape[0], dtype=torch.int32, device=q.device)
    for start in range(0, q.shape[1], _EXACT_FP32_CHUNK):
        stop = start + _EXACT_FP32_CHUNK
        part = q[:, start:stop].float() @ weight[:, start:stop].float().t()
        acc += part.to(torch.int32)
    return acc


def int8_matmul_exact(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Exact int32 product q @ weight.T of int8 q [M, K] and int8 weight [N, K] -> int32 [M, N]."""
    device_key = str(q.device)
    if device_key not in _int_mm_failed_devices and q.device.type in ("cpu", "cuda"):
        try:
            return _int_mm_exact(q, weight)
        except (RuntimeError, NotImplementedError):
            _int_mm_failed_devices.add(device_key)
    return _chunked_fp32_exact(q, weight)


def int8_gemm_reference(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The W8A8 linear after quantization: int8 q [M, K] with fp32 row scales [M] times int8 weight
    [N, K] with fp32 column scales [N] (+ bias [N]) -> [M, N] out_dtype."""
    return _int8_gemm_fp32(q, scale, weight, weight_scale, bias).to(out_dtype)


def _int8_gemm_fp32(q, scale, weight, weight_scale, bias) -> torch.Tensor:
    out = int8_matmul_exact(q, weight).float() * scale[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out


def int8_gemm_gated_add_reference(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    residual: torch.Tensor,
    rows_per_gate: int,
) -> None:
    """``residual`` [M, N] += gate[r // rows_per_gate] * (the ``int8_gemm_reference`` result in fp32),
    in place: the product is rounded to the residual's dtype, then added (one more rounding), as a DiT
    block's ``x = x + gate * linear(h)``. gate: [B, N] float, B = ceil(M / rows_per_gate)."""
    rows = torch.arange(q.shape[0], device=q.device) // rows_per_gate
    gated = _int8_gemm_fp32(q, scale, weight, weight_scale, bias) * gate.float()[rows]
    residual += gated.to(residual.dtype)


def w8a8_linear_reference(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference W8A8 linear on a 2-D input.

    x2d: [M, K] bf16/fp16/fp32; weight: int8 [N, K]; weight_scale: fp32 [N]; bias: [N] or None;
    smooth: fp32 [K] or None. Returns [M, N] in x2d.dtype.
    """
    q, scale = quantize_rows_reference(x2d, smooth)
    return int8_gemm_reference(q, scale, weight, weight_scale, bias, x2d.dtype)
