"""Triton kernels of the fused DiT block ops; the math is dit_fusions_reference.py's.

Each kernel reads its bf16/fp16/fp32 inputs once and writes its result once, in fp32 registers in
between: one program per token row (``layernorm_modulate``, ``gelu_concat``) or per token with all its
heads (``qk_norm_rope``). With ``QUANTIZE`` the row is emitted as int8 + an fp32 row scale for the next
INT8 layer, with the rounding of ``quantize_rows`` (reciprocal of the row scale, round half to even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dit_fusions_reference import GELU_TANH_COEFF, SQRT_2_OVER_PI
from .triton_launch import CachedLauncher, next_power_of_2
from .w8a8_triton import _check_launchable, _round_to_int8, _row_scale

_GELU_C = tl.constexpr(GELU_TANH_COEFF)
_SQRT_2_OVER_PI = tl.constexpr(SQRT_2_OVER_PI)
MAX_ROW = 32768  # widest row the one-program-per-row kernels hold in registers


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr, scale_ptr, shift_ptr, smooth_ptr, out_ptr, row_scale_ptr,
    K, L, stride_xb, stride_xl, stride_scale_b, stride_shift_b, eps,
    QUANTIZE: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // L
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + (row % L).to(tl.int64) * stride_xl + offs,
                mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / K + eps)
    scale = tl.load(scale_ptr + b * stride_scale_b + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * stride_shift_b + offs, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    out_at = out_ptr + row.to(tl.int64) * K + offs
    if QUANTIZE:
        if HAS_SMOOTH:
            y = tl.math.div_rn(y, tl.load(smooth_ptr + offs, mask=mask, other=1.0))
        y = tl.where(mask, y, 0.0)
        row_scale, inverse = _row_scale(tl.max(tl.abs(y), axis=0))
        tl.store(out_at, _round_to_int8(y * inverse), mask=mask)
        tl.store(row_scale_ptr + row, row_scale)
    else:
        tl.store(out_at, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, q_weight_ptr, k_weight_ptr, pe_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
    L, H, offset, stride_qkv_b, stride_qkv_l, stride_pe_b, stride_pe_t,
    stride_out_b, stride_out_h, stride_out_t, eps,
    HAS_PE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program per token: its q, k and v rows of all heads. Loads and stores are whole contiguous
    heads; the (even, odd) pairs RoPE mixes are split and joined in registers."""
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    t = (offset + row % L).to(tl.int64)  # position in the attention sequence
    half: tl.constexpr = HEAD_DIM // 2
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = (h < H) & (d < HEAD_DIM)
    src = qkv_ptr + b * stride_qkv_b + (row % L).to(tl.int64) * stride_qkv_l + h * HEAD_DIM + d
    dst = b * stride_out_b + h * stride_out_h + t * stride_out_t + d
    dtype = q_out_ptr.dtype.element_ty
    if HAS_PE:  # pe[b, 0, t, i, r, c] at 4i + 2r + c; output 2i + r = f[i, r, 0] x[2i] + f[i, r, 1] x[2i + 1]
        freqs = tl.load(pe_ptr + b * stride_pe_b + t * stride_pe_t + tl.arange(0, 2 * HEAD_DIM))
        f_c0, f_c1 = tl.split(tl.reshape(freqs, (half, 2, 2)))  # [half, r] for c = 0, 1
        f00, f10 = tl.split(f_c0)
        f01, f11 = tl.split(f_c1)
    for part in tl.static_range(2):
        weight_ptr = q_weight_ptr if part == 0 else k_weight_ptr
        out_ptr = q_out_ptr if part == 0 else k_out_ptr
        x = tl.load(src + part * H * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        weight = tl.load(weight_ptr + d).to(dtype).to(tl.float32)
        x = (x * rstd[:, None] * weight).to(dtype).to(tl.float32)
        if HAS_PE:
            even, odd = tl.split(tl.reshape(x, (BLOCK_H, half, 2)))
            x = tl.reshape(tl.join(f00[None, :] * even + f01[None, :] * odd,
                                   f10[None, :] * even + f11[None, :] * odd), (BLOCK_H, HEAD_DIM))
        tl.store(out_ptr + dst, x.to(dtype), mask=mask)
    v = tl.load(src + 2 * H * HEAD_DIM, mask=mask, other=0.0)
    tl.store(v_out_ptr + dst, v.to(dtype), mask=mask)


@triton.jit
def _gelu_tanh(x):
    inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
    # tanh through exp of a non-positive argument: no overflow, and no libdevice (absent in the interpreter)
    e = tl.exp(-2.0 * tl.abs(inner))
    t = (1.0 - e) / (1.0 + e)
    return 0.5 * x * (1.0 + tl.where(inner < 0, -t, t))


@triton.jit
def _gelu_concat_kernel(
    attn_ptr, mlp_ptr, smooth_ptr, out_ptr, row_scale_ptr,
    L, KA, KB, stride_ab, stride_al, stride_ah, stride_mb, stride_ml,
    HAS_ATTN: tl.constexpr, HAS_MLP: tl.constexpr, QUANTIZE: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l_in = (row % L).to(tl.int64)
    out_row = out_ptr + row.to(tl.int64) * (KA + KB)
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = tl.arange(0, BLOCK_B)
    mask_a = cols_a < KA
    mask_b = cols_b < KB
    a = tl.zeros((BLOCK_A,), tl.float32)
    g = tl.zeros((BLOCK_B,), tl.float32)
    if HAS_ATTN:
        heads = cols_a // HEAD_DIM
        a_at = attn_ptr + b * stride_ab + l_in * stride_al + heads * stride_ah + cols_a % HEAD_DIM
        a = tl.load(a_at, mask=mask_a, other=0.0).to(tl.float32)
    if HAS_MLP:
        m = tl.load(mlp_ptr + b * stride_mb + l_in * stride_ml + cols_b, mask=mask_b, other=0.0)
        g = _gelu_tanh(m.to(tl.float32))
    if QUANTIZE:
        if HAS_SMOOTH:
            a = tl.math.div_rn(a, tl.load(smooth_ptr + cols_a, mask=mask_a, other=1.0))
            g = tl.math.div_rn(g, tl.load(smooth_ptr + KA + cols_b, mask=mask_b, other=1.0))
        a = tl.where(mask_a, a, 0.0)
        g = tl.where(mask_b, g, 0.0)
        amax = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(g), axis=0))
        row_scale, inverse = _row_scale(amax)
        if HAS_ATTN:
            tl.store(out_row + cols_a, _round_to_int8(a * inverse), mask=mask_a)
        if HAS_MLP:
            tl.store(out_row + KA + cols_b, _round_to_int8(g * inverse), mask=mask_b)
        tl.store(row_scale_ptr + row, row_scale)
    else:
        if HAS_ATTN:
            tl.store(out_row + cols_a, a.to(out_ptr.dtype.element_ty), mask=mask_a)
        if HAS_MLP:
            tl.store(out_row + KA + cols_b, g.to(out_ptr.dtype.element_ty), mask=mask_b)


def _row_warps(width: int) -> int:
    return 4 if width <= 4096 else 8 if width <= 8192 else 16


_layernorm_modulate_launcher = CachedLauncher(_layernorm_modulate_kernel)
_qk_norm_rope_launcher = CachedLauncher(_qk_norm_rope_kernel)
_gelu_concat_launcher = CachedLauncher(_gelu_concat_kernel)


def _outputs(rows: int, width: int, dtype: torch.dtype, device: torch.device, quantize: bool):
    out = torch.empty((rows, width), dtype=torch.int8 if quantize else dtype, device=device)
    row_scale = torch.empty((rows,), dtype=torch.float32, device=device) if quantize else out
    return out, row_scale


def layernorm_modulate_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-6,
    smooth: torch.Tensor | None = None,
    quantize: bool = False,
):
    """Triton ``layernorm_modulate`` (see the reference for shapes; x [B, L, K] with K contiguous,
    scale/shift [B, K] with K contiguous)."""
    _check_launchable(x)
    b, length, k = x.shape
    if k > MAX_ROW:
        raise ValueError(f"DiT Quant: layernorm_modulate rows of {k} values exceed {MAX_ROW}")
    out, row_scale = _outputs(b * length, k, x.dtype, x.device, quantize)
    if b * length:
        _layernorm_modulate_launcher(
            (b * length,),
            (x, scale, shift, smooth if smooth is not None else row_scale, out, row_scale,
             k, length, x.stride(0), x.stride(1), scale.stride(0), shift.stride(0), eps),
            (("QUANTIZE", quantize), ("HAS_SMOOTH", smooth is not None),
             ("BLOCK_K", next_power_of_2(k)), ("num_warps", _row_warps(k))),
        )
    return (out, row_scale) if quantize else out.view(b, length, k)


def qk_norm_rope_triton(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    pe: torch.Tensor | None,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    offset: int,
    eps: float = 1e-6,
) -> None:
    """Triton ``qk_norm_rope`` (see the reference). qkv's last dim and q/k/v_out's last dim must be
    contiguous and q/k/v_out share strides; pe's last three dims contiguous."""
    _check_launchable(qkv)
    b, length, _ = qkv.shape
    heads, head_dim = q_out.shape[1], q_out.shape[3]
    if b * length == 0:
        return
    pe_strides = (pe.stride(0) if pe.shape[0] > 1 else 0, pe.stride(2)) if pe is not None else (0, 0)
    _qk_norm_rope_launcher(
        (b * length,),
        (qkv, q_weight, k_weight, pe if pe is not None else q_weight, q_out, k_out, v_out,
         length, heads, offset, qkv.stride(0), qkv.stride(1), *pe_strides,
         q_out.stride(0), q_out.stride(1), q_out.stride(2), eps),
        (("HAS_PE", pe is not None), ("HEAD_DIM", head_dim), ("BLOCK_H", next_power_of_2(heads)),
         ("num_warps", 4)),
    )


def gelu_concat_triton(
    attn: torch.Tensor | None,
    mlp: torch.Tensor | None,
    smooth: torch.Tensor | None = None,
    quantize: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """Triton ``gelu_concat`` (see the reference). attn [B, L, H, D] with D contiguous; mlp [B, L, Kb]
    with Kb contiguous."""
    first = attn if attn is not None else mlp
    _check_launchable(first)
    b, length = first.shape[:2]
    ka = attn.shape[2] * attn.shape[3] if attn is not None else 0
    kb = mlp.shape[2] if mlp is not None else 0
    if ka + kb > MAX_ROW:
        raise ValueError(f"DiT Quant: gelu_concat rows of {ka + kb} values exceed {MAX_ROW}")
    out, row_scale = _outputs(b * length, ka + kb, out_dtype or first.dtype, first.device, quantize)
    if b * length:
        attn_strides = (attn.stride(0), attn.stride(1), attn.stride(2)) if attn is not None else (0, 0, 0)
        mlp_strides = (mlp.stride(0), mlp.stride(1)) if mlp is not None else (0, 0)
        _gelu_concat_launcher(
            (b * length,),
            (attn if attn is not None else mlp, mlp if mlp is not None else attn,
             smooth if smooth is not None else row_scale, out, row_scale,
             length, ka, kb, *attn_strides, *mlp_strides),
            (("HAS_ATTN", attn is not None), ("HAS_MLP", mlp is not None), ("QUANTIZE", quantize),
             ("HAS_SMOOTH", smooth is not None), ("HEAD_DIM", attn.shape[3] if attn is not None else 1),
             ("BLOCK_A", next_power_of_2(max(ka, 1))), ("BLOCK_B", next_power_of_2(max(kb, 1))),
             ("num_warps", _row_warps(ka + kb))),
        )
    return (out, row_scale) if quantize else out.view(b, length, ka + kb)
