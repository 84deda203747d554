"""Fused GGUF dequantize-and-multiply: ``y = x @ dequant(W).T + bias`` without materializing W.

Each program owns an output tile [BLOCK_M, BLOCK_N] and walks K in steps of 256 values. Per step it loads
the raw GGUF bytes of its BLOCK_N weight rows, decodes them in registers to the activation dtype and feeds
the tensor cores (``tl.dot``) directly: no dequantized copy of the weight is ever written to memory.

The K order trick: every supported format stores a block as two halves of nibbles/bytes ("lo" and
"hi"), each half a run of consecutive K indices (Q4_K: lo = low nibbles = values 64p + l, hi = high
nibbles = values 64p + 32 + l; Q8_0/Q4_0/...: lo = values 32g + l, hi = 32g + 16 + l; Q6_K: runs of 64).
Instead of interleaving the decoded halves into natural order (register shuffles), the kernel loads the
activation columns of each half and issues one dot per half: a dot product does not care about the
order of K. Activation loads stay contiguous runs of 16-64 values.

``gguf_linear_int8_q8_0`` is the INT8 tensor-core variant for Q8_0: activations quantized per token
with ``kernels.quantize_rows`` (the W8A8 kernels' quantizer), int8 x int8 -> int32 dots per 32-value
block, each block's int32 sum scaled by the weight block scale into an fp32 accumulator, then by the
token scale in the epilogue.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gguf_dequant_reference import BLOCK_LAYOUT
from .gguf_dequant_triton import k_scale_min, load_f16

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FUSED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_QTYPE_ID = {name: i for i, name in enumerate(FUSED_TYPES)}
K_STEP = 256  # values of K per loop iteration: one K-quant super-block or eight 32-value blocks
# Length of the runs of consecutive K indices in one half of a block (see the module docstring).
_RUN = {"Q8_0": 16, "Q4_0": 16, "Q4_1": 16, "Q5_0": 16, "Q5_1": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 64}


@triton.jit
def _legacy_halves(row, step, n_mask, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr):
    """Eight 32-value blocks (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1) of BLOCK_N rows -> (lo, hi) float32 [BLOCK_N, 128]:
    lo[:, 16g + l] is value 32g + l of the step, hi[:, 16g + l] value 32g + 16 + l."""
    g = tl.arange(0, 8)[None, :, None]
    lane = tl.arange(0, 16)[None, None, :]
    mask = n_mask[:, None, None]
    base = row[:, :, None] + (step * 8 + g) * TYPE_SIZE            # [BN, 8, 1] byte address of each block
    d = load_f16(base, mask)
    if QTYPE == 0:  # Q8_0: d | qs[32] int8
        lo = tl.load(base + 2 + lane, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32) * d
        hi = tl.load(base + 18 + lane, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32) * d
    else:
        qs_offset: tl.constexpr = 2 if QTYPE == 1 else 4 if QTYPE == 2 else 6 if QTYPE == 3 else 8
        byte = tl.load(base + qs_offset + lane, mask=mask, other=0).to(tl.int32)
        q_lo = byte & 0xF
        q_hi = byte >> 4
        if QTYPE == 3 or QTYPE == 4:  # Q5_0/Q5_1: 5th bits, bit j of a little-endian u32
            qh_at = base + qs_offset - 4
            bits_lo = tl.load(qh_at + lane // 8, mask=mask, other=0).to(tl.int32)
            bits_hi = tl.load(qh_at + 2 + lane // 8, mask=mask, other=0).to(tl.int32)
            q_lo = q_lo | (((bits_lo >> (lane % 8)) & 1) << 4)
            q_hi = q_hi | (((bits_hi >> (lane % 8)) & 1) << 4)
        if QTYPE == 1:
            lo = d * (q_lo - 8).to(tl.float32)
            hi = d * (q_hi - 8).to(tl.float32)
        elif QTYPE == 3:
            lo = d * (q_lo - 16).to(tl.float32)
            hi = d * (q_hi - 16).to(tl.float32)
        else:  # Q4_1 / Q5_1: d * q + m
            m = load_f16(base + 2, mask)
            lo = d * q_lo.to(tl.float32) + m
            hi = d * q_hi.to(tl.float32) + m
    return tl.reshape(lo, (lo.shape[0], 128)), tl.reshape(hi, (hi.shape[0], 128))


@triton.jit
def _k_quant_halves(row, step, n_mask, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr):
    """One super-block of BLOCK_N rows -> (lo, hi) float32 [BLOCK_N, 128].
    Q4_K/Q5_K: lo[:, 32p + l] = value 64p + l, hi = value 64p + 32 + l.
    Q6_K: lo[:, 64h + c] = value 128h + c, hi = value 128h + 64 + c."""
    base = row + step * TYPE_SIZE                                      # [BN, 1]
    mask = n_mask[:, None]
    if QTYPE == 7:  # Q6_K: ql[128] | qh[64] | scales[16] int8 | d
        h = tl.arange(0, 2)[None, :, None]
        c = tl.arange(0, 64)[None, None, :]
        b3 = base[:, :, None]
        m3 = n_mask[:, None, None]
        ql = tl.load(b3 + h * 64 + c, mask=m3, other=0).to(tl.int32)
        qh = tl.load(b3 + 128 + h * 32 + c % 32, mask=m3, other=0).to(tl.int32)
        shift = (c // 32) * 2
        q_lo = ((ql & 0xF) | (((qh >> shift) & 3) << 4)) - 32
        q_hi = ((ql >> 4) | (((qh >> (shift + 4)) & 3) << 4)) - 32
        d = load_f16(b3 + 208, m3)
        sc_lo = tl.load(b3 + 192 + h * 8 + c // 16, mask=m3, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        sc_hi = tl.load(b3 + 196 + h * 8 + c // 16, mask=m3, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        lo = (d * sc_lo) * q_lo.to(tl.float32)
        hi = (d * sc_hi) * q_hi.to(tl.float32)
    else:  # Q4_K: d | dmin | scales[12] | qs[128];  Q5_K: d | dmin | scales[12] | qh[32] | qs[128]
        p = tl.arange(0, 4)[None, :]
        sc_lo, mn_lo = k_scale_min(base + 4, 2 * p, mask)              # [BN, 4]: sub-blocks 2p
        sc_hi, mn_hi = k_scale_min(base + 4, 2 * p + 1, mask)          # sub-blocks 2p + 1
        d = load_f16(base, mask)
        dmin = load_f16(base + 2, mask)
        lane = tl.arange(0, 32)[None, None, :]
        b3 = base[:, :, None]
        m3 = n_mask[:, None, None]
        qs_offset: tl.constexpr = 16 if QTYPE == 5 else 48
        byte = tl.load(b3 + qs_offset + p[:, :, None] * 32 + lane, mask=m3, other=0).to(tl.int32)
        q_lo = byte & 0xF
        q_hi = byte >> 4
        if QTYPE == 6:
            qh = tl.load(b3 + 16 + lane, mask=m3, other=0).to(tl.int32)
            q_lo = q_lo | (((qh >> (2 * p[:, :, None])) & 1) << 4)
            q_hi = q_hi | (((qh >> (2 * p[:, :, None] + 1)) & 1) << 4)
        lo = (d * sc_lo)[:, :, None] * q_lo.to(tl.float32) - (dmin * mn_lo)[:, :, None]
        hi = (d * sc_hi)[:, :, None] * q_hi.to(tl.float32) - (dmin * mn_hi)[:, :, None]
    return tl.reshape(lo, (lo.shape[0], 128)), tl.reshape(hi, (hi.shape[0], 128))


@triton.jit
def _gguf_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, row_bytes,
    QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, RUN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group_size = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cols = tl.arange(0, 128)
    col_lo = (cols // RUN) * (2 * RUN) + cols % RUN                    # K index of each lo column
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * row_bytes          # [BN, 1] byte address of each row

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K // 256):
        if QTYPE < 5:
            w_lo, w_hi = _legacy_halves(w_rows, step, n_mask, QTYPE, TYPE_SIZE)
        else:
            w_lo, w_hi = _k_quant_halves(w_rows, step, n_mask, QTYPE, TYPE_SIZE)
        k0 = step * 256
        a_lo = tl.load(x_rows + k0 + col_lo[None, :], mask=m_mask[:, None], other=0.0)
        a_hi = tl.load(x_rows + k0 + RUN + col_lo[None, :], mask=m_mask[:, None], other=0.0)
        w_lo = w_lo.to(a_lo.dtype)  # the weight is rounded to the activation dtype, like dequant-then-matmul
        w_hi = w_hi.to(a_hi.dtype)
        if DOT_F32:
            acc = tl.dot(a_lo.to(tl.float32), tl.trans(w_lo.to(tl.float32)), acc, input_precision="ieee")
            acc = tl.dot(a_hi.to(tl.float32), tl.trans(w_hi.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_lo, tl.trans(w_lo), acc)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _q8_0_int8_kernel(
    xq_ptr, xs_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, row_bytes,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group_size = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    lane = tl.arange(0, 32)
    x_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * row_bytes

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for blk in range(0, K // 32):
        a = tl.load(x_rows + blk * 32 + lane[None, :], mask=m_mask[:, None], other=0)
        w_at = w_rows + blk * 34
        w = tl.load(w_at + 2 + lane[None, :], mask=n_mask[:, None], other=0).to(tl.int8, bitcast=True)
        d = load_f16(w_at, n_mask[:, None])                             # [BN, 1]
        part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        acc += part.to(tl.float32) * tl.trans(d)

    acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _tile_config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for M rows. Large M amortizes the weight decoding over
    more rows (the decode costs ~4 ALU ops per weight value per BLOCK_M rows)."""
    if INTERPRETED:
        return 32, 32, 4, 1
    if m <= 32:
        return 16, 64, 4, 3
    if m <= 128:
        return 64, 64, 4, 3
    if m <= 1024:
        return 128, 64, 8, 3
    return 128, 128, 8, 3


def _check(x2d: torch.Tensor, raw: torch.Tensor, qtype: str, n: int, k: int, bias: torch.Tensor | None) -> None:
    if x2d.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("DiT Quant: the fused GGUF kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1)")
    if k % K_STEP:
        raise ValueError(f"DiT Quant: fused GGUF matmul needs K to be a multiple of {K_STEP}, got {k}")
    block_size, type_size = BLOCK_LAYOUT[qtype]
    if raw.dtype != torch.uint8 or raw.numel() != n * (k // block_size) * type_size:
        raise ValueError(f"DiT Quant: weight bytes {raw.dtype} {tuple(raw.shape)} do not hold a {qtype} "
                         f"[{n}, {k}] matrix")
    if bias is not None and (bias.shape != (n,) or bias.device != x2d.device):
        raise ValueError(f"DiT Quant: bias must be [{n}] on {x2d.device}, got {tuple(bias.shape)} on {bias.device}")


def _grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int]:
    return (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)


def gguf_linear_fused(x2d: torch.Tensor, raw: torch.Tensor, qtype: str, n: int, k: int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2d [M, K] (bf16/fp16/fp32, K contiguous) @ dequant(raw).T + bias -> [M, N] in x2d.dtype.

    raw: the GGUF bytes of a [N, K] weight (uint8, rows contiguous); qtype in FUSED_TYPES; K % 256 == 0.
    """
    if qtype not in _QTYPE_ID:
        raise ValueError(f"DiT Quant: no fused GGUF kernel for {qtype}; have {FUSED_TYPES}")
    _check(x2d, raw, qtype, n, k, bias)
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    m = x2d.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    block_m, block_n, warps, stages = _tile_config(m)
    _gguf_matmul_kernel[_grid(m, n, block_m, block_n)](
        x2d, raw, bias if bias is not None else out, out,
        m, n, k, x2d.stride(0), out.stride(0), raw.numel() // n,
        QTYPE=_QTYPE_ID[qtype], TYPE_SIZE=BLOCK_LAYOUT[qtype][1], RUN=_RUN[qtype], HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8,
        # fp32 inputs get exact fp32 dots; the interpreter's bf16/fp16 dots are wrong in Triton 3.9
        DOT_F32=x2d.dtype == torch.float32 or INTERPRETED,
        num_warps=warps, num_stages=stages,
    )
    return out


def gguf_linear_int8_q8_0(xq: torch.Tensor, x_scale: torch.Tensor, raw: torch.Tensor, n: int, k: int,
                          bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """INT8 tensor-core Q8_0 linear: per-token int8 activations xq [M, K] with fp32 scales x_scale [M]
    (from ``kernels.quantize_rows``) times the Q8_0 weight bytes raw ([N, K] matrix) -> [M, N] out_dtype."""
    _check(xq, raw, "Q8_0", n, k, bias)
    if xq.dtype != torch.int8 or x_scale.shape != xq.shape[:1]:
        raise ValueError("DiT Quant: int8 Q8_0 matmul needs int8 activations [M, K] and fp32 scales [M]")
    m = xq.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    block_m, block_n, warps, stages = _tile_config(m)
    _q8_0_int8_kernel[_grid(m, n, block_m, block_n)](
        xq, x_scale, raw, bias if bias is not None else out, out,
        m, n, k, xq.stride(0), out.stride(0), raw.numel() // n,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return out
