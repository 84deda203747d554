"""GGUF K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in vectorized torch, without llama.cpp.

Each encoder is a faithful port of the reference quantizer in ggml's ``ggml-quants.c`` (the code path
llama.cpp uses when no importance matrix is given):

  Q2_K  ``quantize_row_q2_K_ref`` with ``make_qkx2_quants(16, 3, |x| weights, -0.5, 0.1, 15, use_mad)``
  Q3_K  ``quantize_row_q3_K_ref`` with ``make_q3_quants(16, 4, do_rmse)``
  Q4_K  ``quantize_row_q4_K_ref`` with ``make_qkx2_quants(32, 15, av_x + |x| weights, -1, 0.1, 20)``
  Q5_K  ``quantize_row_q5_K_ref`` with ``make_qkx2_quants(32, 31, av_x + |x| weights, -0.5, 0.1, 15)``
  Q6_K  ``quantize_row_q6_K_ref`` with ``make_qx_quants(16, 32, rmse_type=1)``

"Faithful" means: the same float32 operations in the same order as the C source compiled without FMA
contraction, the sums accumulated sequentially over the sub-block like the C loops, the same tie rules
(first maximum wins, round-half-to-even for ``nearest_int``), the same integer wrap-arounds and the same
quirks (a sub-block whose requantization scale is zero keeps its first-pass levels). The loops over
sub-blocks, blocks and rows become tensor operations; the loops *within* a sub-block that carry state
stay loops. tests/test_gguf_kquants.py checks byte equality against a literal scalar port on sampled
blocks. ``nearest_int`` is only defined by ggml for |x| < 2^22; there (and only there) we agree with it.

Runs on the device of the input (a GPU makes it fast); memory is bounded by processing blocks in chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15
KQUANT_TYPE_SIZES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_CHUNK_BLOCKS = 8192

f32 = np.float32


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 accumulated in order in t's dtype, like ``float s = 0; for (i...) s += t[i]``."""
    acc = torch.zeros_like(t[0])
    for row in t:
        acc.add_(row)
    return acc


def _div(numer: torch.Tensor | float, denom: torch.Tensor | float) -> torch.Tensor:
    """Correctly rounded float32 division. A scalar operand is expanded to a full tensor first: torch
    computes ``tensor / scalar`` and ``scalar / tensor`` as a multiplication by a reciprocal (two
    roundings)."""
    if not isinstance(numer, torch.Tensor):
        numer = torch.full_like(denom, float(numer))
    if not isinstance(denom, torch.Tensor):
        denom = torch.full_like(numer, float(denom))
    return numer / denom


def _round_clamp(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32 (clamping first keeps inf/huge values harmless)."""
    return torch.round(v.clamp(lo - 1, hi + 1)).clamp_(lo, hi)


def _to_fp16_and_back(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): round to nearest-even fp16."""
    return v.to(torch.float16).to(torch.float32)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> little-endian fp16 bytes uint8 [n, 2]."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _signed_max_by_abs(v: torch.Tensor, dim: int) -> torch.Tensor:
    """The value of largest magnitude along ``dim`` (the first one on ties), like ``if (fabsf(x) > amax)``."""
    return v.gather(dim, v.abs().argmax(dim=dim, keepdim=True)).squeeze(dim)


# The sub-block searches below take x as [n, G]: element i of every one of G sub-blocks in row i, so the
# in-order sums over a sub-block are n contiguous vector additions.


def make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted min/scale search for asymmetric levels 0..nmax per column of ``x`` [n, G] (float32).

    Returns (levels float32 [n, G], scale [G], the_min [G]) with x ~ scale * level - the_min.
    """
    sum_w = weights[0].clone()
    sum_x = weights[0] * x[0]
    for i in range(1, x.shape[0]):
        sum_w.add_(weights[i])
        sum_x.add_(weights[i] * x[i])
    lo = x.min(dim=0).values
    hi = x.max(dim=0).values
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo

    def error(scale: torch.Tensor, levels: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        diff = scale * levels + minimum - x
        return _seq_sum(weights * (diff.abs() if use_mad else diff * diff))

    iscale = _div(nmax, hi - lo)
    scale = _div(1, iscale)
    levels = _round_clamp(iscale * (x - lo), 0, nmax)
    best_error = error(scale, levels, lo)
    flat_min = -lo
    for step in range(nstep + 1):
        iscale = _div(f32(rmin) + f32(rdelta) * f32(step) + f32(nmax), hi - lo)
        trial = _round_clamp(iscale * (x - lo), 0, nmax)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * trial), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive_min = this_min > 0
        this_min = torch.where(positive_min, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive_min, sum_xl / sum_l2, this_scale)
        this_error = error(this_scale, trial, this_min)
        better = (det > 0) & (this_error < best_error)
        levels = torch.where(better, trial, levels)
        best_error = torch.where(better, this_error, best_error)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return levels, scale, torch.where(flat, flat_min, -lo)


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` per column of x [n, G]: symmetric levels
    -nmax..nmax-1 with x^2 weights and a 19-point scale search. Returns (levels + nmax, scale)."""
    peak = _signed_max_by_abs(x, 0)
    zero = x.abs().max(dim=0).values < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = _round_clamp(iscale * x, -nmax, nmax - 1)
        return levels, _seq_sum(wx * levels), _seq_sum(w * levels * levels)

    levels, sumlx, suml2 = fit(_div(-nmax, peak))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial, slx, sl2 = fit(_div(-(f32(nmax) + f32(0.1) * f32(step)), peak))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = torch.where(better, trial, levels)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return levels + nmax, scale


def make_q3_quants_rmse(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` per column of x [n, G]: symmetric levels with a
    coordinate-descent refinement (5 passes). Returns (levels + nmax, scale)."""
    peak = _signed_max_by_abs(x, 0)
    zero = x.abs().max(dim=0).values < GROUP_MAX_EPS
    levels = _round_clamp(_div(-nmax, peak) * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seq_sum(wx * levels)
    suml2 = _seq_sum(w * levels * levels)
    for _ in range(5):  # a pass that changes nothing would change nothing again: no early exit needed
        for i in range(x.shape[0]):
            li, xi, wi, wxi = levels[i], x[i], w[i], wx[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = _round_clamp(xi * sl2 / slx, -nmax, nmax - 1)
            slx_new = slx + wxi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            take = (
                (slx > 0)
                & (new_l != li)
                & (sl2_new > 0)
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            )
            levels[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return levels + nmax, scale


def _columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """Blocks [B, 256] -> sub-blocks of n as columns [n, B * 256 / n] (contiguous)."""
    return x.reshape(-1, n).t().contiguous()


def _rows_of(columns: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of :func:`_columns`: [n, G] -> [B, 256 / n, n]."""
    return columns.t().reshape(b, -1, columns.shape[0])


def _quantize_6bit_scales(values: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """``MIN(63, (uint8_t)nearest_int(63/peak * v))`` with 63/peak taken as 0 when peak <= 0."""
    inv = torch.where(peak > 0, _div(63, peak), torch.zeros_like(peak))
    return (torch.round(inv[:, None] * values).to(torch.int32) & 0xFF).clamp(max=63)


def _requantize(
    x: torch.Tensor, levels: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, lo: int, hi: int
) -> torch.Tensor:
    """Second pass ``l = clamp(nearest_int((x + offset) / step))`` for sub-blocks with step != 0;
    the others keep their first-pass levels (the C code ``continue``s). Returns levels + (-lo)."""
    numer = x if offset is None else x + offset[..., None]
    fresh = _round_clamp(numer / step[..., None], lo, hi) - lo
    return torch.where((step != 0)[..., None], fresh, levels)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins [B, 8] -> the 12 packed bytes of Q4_K/Q5_K [B, 12]."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    return torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
        ],
        dim=1,
    )


def _pack_crumbs(levels: torch.Tensor) -> torch.Tensor:
    """2-bit levels [B, 256] -> 64 bytes: byte h*32 + l holds elements h*128 + 32*i + l in bits 2i."""
    q = levels.to(torch.uint8).view(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_nibble_pairs(levels: torch.Tensor) -> torch.Tensor:
    """4-bit levels [B, 256] -> 128 bytes: byte p*32 + l holds elements 64p + l (low) and 64p + 32 + l."""
    q = levels.to(torch.uint8).view(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _bit_planes(bits: torch.Tensor, planes: int) -> torch.Tensor:
    """0/1 values [B, planes * 32] -> 32 bytes: bit i of byte l is element 32 * i + l."""
    b = bits.to(torch.uint8).view(-1, planes, 32)
    out = torch.zeros_like(b[:, 0])
    for i in range(planes):
        out |= b[:, i] << i
    return out


def _superblock_scale_search(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max_scale/max_min of the K-quant refs (``m = 0; if (v > m) m = v``): the largest value per block
    if positive, else +0."""

    def positive_max(v: torch.Tensor) -> torch.Tensor:
        m = v.max(dim=1).values
        return torch.where(m > 0, m, torch.zeros_like(m))

    return positive_max(scales), positive_max(mins)


def _q4_q5_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """The shared part of quantize_row_q4_K_ref / q5_K_ref on x [B, 256]: returns
    (d bytes, dmin bytes, packed scales, levels [B, 256])."""
    b = x.shape[0]
    sub = _columns(x, 32)
    av_x = torch.sqrt(_div(_seq_sum(sub * sub), 32))
    weights = av_x + sub.abs()
    levels, scales, mins = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, use_mad=False)
    levels = _rows_of(levels, b)
    scales, mins = scales.view(b, 8), mins.view(b, 8)
    max_scale, max_min = _superblock_scale_search(scales, mins)
    ls, lm = _quantize_6bit_scales(scales, max_scale), _quantize_6bit_scales(mins, max_min)
    d = _to_fp16_and_back(_div(max_scale, 63))
    dmin = _to_fp16_and_back(_div(max_min, 63))
    step = d[:, None] * ls.to(torch.float32)
    offset = dmin[:, None] * lm.to(torch.float32)
    levels = _requantize(x.view(b, 8, 32), levels, step, offset, 0, nmax).reshape(b, QK_K)
    return _fp16_bytes(d), _fp16_bytes(dmin), _pack_k_scales(ls, lm), levels


def quantize_q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, 256] -> Q4_K blocks uint8 [B, 144] (``quantize_row_q4_K_ref``)."""
    d, dmin, scales, levels = _q4_q5_k(x, 15, -1.0, 20)
    return torch.cat([d, dmin, scales, _pack_nibble_pairs(levels)], dim=1)


def quantize_q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, 256] -> Q5_K blocks uint8 [B, 176] (``quantize_row_q5_K_ref``)."""
    d, dmin, scales, levels = _q4_q5_k(x, 31, -0.5, 15)
    # qh bit i of byte l is the 5th bit of element 32 * i + l; nibbles pair elements 64p + l and 64p + 32 + l.
    high = _bit_planes(levels >= 16, 8)
    return torch.cat([d, dmin, scales, high, _pack_nibble_pairs(levels % 16)], dim=1)


def quantize_q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, 256] -> Q6_K blocks uint8 [B, 210] (``quantize_row_q6_K_ref``)."""
    b = x.shape[0]
    levels, scales = make_qx_quants_rmse1(_columns(x, 16), 32)
    levels = _rows_of(levels, b)
    scales = scales.view(b, 16)
    max_scale = _signed_max_by_abs(scales, 1)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = _div(-128, max_scale)
    d = _to_fp16_and_back(_div(1, iscale))
    sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    levels = _requantize(x.view(b, 16, 16), levels, d[:, None] * sc, None, -32, 31)
    q = levels.reshape(b, 2, 4, 32).to(torch.uint8)  # [half, quarter, l] = element 128 h + 32 i + l
    ql = torch.cat(
        [(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4), (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)],
        dim=2,
    ).reshape(b, 128)
    qh = (
        (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    ).reshape(b, 64)
    out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], dim=1)
    return torch.where(empty[:, None], torch.zeros_like(out), out)


def quantize_q3_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, 256] -> Q3_K blocks uint8 [B, 110] (``quantize_row_q3_K_ref``)."""
    b = x.shape[0]
    levels, scales = make_q3_quants_rmse(_columns(x, 16), 4)
    levels = _rows_of(levels, b)
    scales = scales.view(b, 16)
    max_scale = _signed_max_by_abs(scales, 1)
    has_scale = max_scale != 0
    iscale = _div(-32, max_scale)
    ls = (torch.round(iscale[:, None] * scales).clamp(-32, 31) + 32).to(torch.int32)
    ls = torch.where(has_scale[:, None], ls, torch.zeros_like(ls))  # memset(scales, 0) when max_scale == 0
    d = torch.where(has_scale, _to_fp16_and_back(_div(1, iscale)), torch.zeros_like(iscale))
    step = d[:, None] * (ls - 32).to(torch.float32)
    levels = _requantize(x.view(b, 16, 16), levels, step, None, -4, 3).reshape(b, QK_K)
    ls8 = ls.to(torch.uint8)
    packed = torch.cat(
        [(ls8[:, :8] & 0x0F) | ((ls8[:, 8:] & 0x0F) << 4), _bit_pairs_of_scales(ls8 >> 4)], dim=1
    )
    hmask = _bit_planes(levels > 3, 8)
    low = torch.where(levels > 3, levels - 4, levels)
    return torch.cat([hmask, _pack_crumbs(low), packed, _fp16_bytes(d)], dim=1)


def _bit_pairs_of_scales(high: torch.Tensor) -> torch.Tensor:
    """High 2 bits of 16 Q3_K scales [B, 16] -> 4 bytes: byte j%4 holds scale j at bits 2*(j//4)."""
    h = high.view(-1, 4, 4)  # [j // 4, j % 4]
    return h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)


def quantize_q2_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, 256] -> Q2_K blocks uint8 [B, 84] (``quantize_row_q2_K_ref``)."""
    b = x.shape[0]
    sub = _columns(x, 16)
    levels, scales, mins = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    levels = _rows_of(levels, b)
    scales, mins = scales.view(b, 16), mins.view(b, 16)
    max_scale, max_min = _superblock_scale_search(scales, mins)
    sc = torch.where(
        max_scale[:, None] > 0,
        torch.round(_div(15, max_scale)[:, None] * scales).to(torch.int32),
        torch.zeros_like(scales, dtype=torch.int32),
    )
    mn = torch.where(
        max_min[:, None] > 0,
        torch.round(_div(15, max_min)[:, None] * mins).to(torch.int32),
        torch.zeros_like(mins, dtype=torch.int32),
    )
    packed = ((sc & 0xFF) | ((mn << 4) & 0xFF)).to(torch.uint8)
    d = torch.where(max_scale > 0, _to_fp16_and_back(_div(max_scale, 15)), torch.zeros_like(max_scale))
    dmin = torch.where(max_min > 0, _to_fp16_and_back(_div(max_min, 15)), torch.zeros_like(max_min))
    step = d[:, None] * (packed & 0x0F).to(torch.float32)
    offset = dmin[:, None] * (packed >> 4).to(torch.float32)
    levels = _requantize(x.view(b, 16, 16), levels, step, offset, 0, 3).reshape(b, QK_K)
    return torch.cat([packed, _pack_crumbs(levels), _fp16_bytes(d), _fp16_bytes(dmin)], dim=1)


_ENCODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": quantize_q2_k_blocks,
    "Q3_K": quantize_q3_k_blocks,
    "Q4_K": quantize_q4_k_blocks,
    "Q5_K": quantize_q5_k_blocks,
    "Q6_K": quantize_q6_k_blocks,
}


def quantize_kquant(rows: torch.Tensor, qtype: str) -> torch.Tensor:
    """Encode float rows [R, K] (K a multiple of 256, finite) as ``qtype`` bytes uint8 [R, K/256 * size].

    Computes in float32 on ``rows.device``; blocks are processed in chunks to bound memory.
    """
    if qtype not in _ENCODERS:
        raise ValueError(f"DiT Quant: {qtype!r} is not a K-quant type; expected one of {sorted(_ENCODERS)}")
    if rows.dim() != 2 or rows.shape[1] % QK_K:
        raise ValueError(
            f"DiT Quant: K-quant rows must be 2-D with a multiple of {QK_K} columns, "
            f"got shape {tuple(rows.shape)}"
        )
    blocks = rows.to(torch.float32).reshape(-1, QK_K)
    encode = _ENCODERS[qtype]
    out = torch.cat([encode(blocks[i : i + _CHUNK_BLOCKS]) for i in range(0, blocks.shape[0], _CHUNK_BLOCKS)])
    return out.view(rows.shape[0], -1)
