"""Triton kernels of the INT8 W8A8 linear (see w8a8_reference.py for the exact math they reproduce).

- ``_quantize_rows_kernel``: per-row amax, fp32 scale and int8 row (one program per row);
- ``_w8a8_gemm_kernel``: tiled int8 tensor-core GEMM, int32 accumulation, fused epilogue (row scale x
  column scale (+ bias) -> output dtype); in its QUANTIZE_A mode it takes the float activation and
  quantizes it on load instead (one launch, for small M);
- ``_w8a8_gemm_tma_kernel``: persistent Hopper variant of the int8-A GEMM with TMA descriptors;
- both GEMMs can instead add ``gate * result`` to a residual in place (``GatedAdd``: a DiT block's gated
  residual update; on Hopper a TMA reduce-add in L2);
- ``_w8a8_gemv_kernel``: one launch for a few rows: each program quantizes its row itself and takes the
  integer dot products on CUDA cores (bit-identical to the two kernels above).
Which runs is a ``GemmConfig`` (see KINDS and ``candidate_configs``), chosen by w8a8_autotune.py.
A ``LaunchPlan`` keeps one layer's launches bound for repeated calls with the same input signature.

The weight is int8 [N, K] with K contiguous (nn.Linear layout): 8-bit tensor-core operands must be
K-major on Hopper (wgmma) and this layout keeps both operand loads contiguous along K.
Rounding is round-half-even through the 1.5 * 2**23 trick (exact for |v| < 2**22, here |v| <= 127),
divisions use IEEE ``div_rn`` so quantized values match torch bit for bit.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# TensorDescriptor is None on Triton < 3.4 (no host-side TMA descriptors): "tma" configs are never listed.
from . import triton_launch
from .triton_launch import BoundLaunch, CachedLauncher, TensorDescriptor, ceil_div, next_power_of_2

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:  # programmatic dependent launch: the kernel-side calls and the launch option (sm_90+ at run time)
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except ImportError:
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

# Read per call (tests and benchmarks compare both): DIT_QUANT_PDL=0 launches the GEMM the plain way.
USE_PDL = os.environ.get("DIT_QUANT_PDL", "1") != "0"

# 1.5 * 2**23: adding it to an fp32 of magnitude < 2**22 rounds it to the nearest even integer, which then
# sits in the sum's low mantissa bits as a two's-complement number.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _round_to_int8(v):
    """fp32 within +-127 -> int8, rounded half to even: the low byte of the rounded sum's bits.

    Callers pass x * inverse with ``inverse`` from ``_row_scale`` of an amax over the same values, which
    is within 127 * (1 + 3 * 2**-24), so no clamp is needed. A float-to-int conversion would run at a quarter
    of the fp32 rate (removing it made the quantize kernel ~10% faster, run 18 of the log); this takes one
    add."""
    return (v + _ROUND_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _row_scale(amax):
    """A row's amax -> (fp32 scale = amax / 127 floored at 1e-12 / 127, its IEEE reciprocal)."""
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _load_smoothed(ptrs, smooth_ptrs, mask, HAS_SMOOTH: tl.constexpr):
    xs = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        xs = tl.math.div_rn(xs, tl.load(smooth_ptrs, mask=mask, other=1.0))
    return xs


@triton.jit
def _row_scale_of(x_row, smooth_ptr, K, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (scale, reciprocal) of the row at ``x_row`` (``_row_scale`` of its smoothed amax), reading it in
    steps of BLOCK_K elements."""
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xs = _load_smoothed(x_row + k0 + offs, smooth_ptr + k0 + offs, k0 + offs < K, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.abs(xs))
    return _row_scale(tl.max(amax, axis=0))


@triton.jit
def _store_quantized_row(x_row, smooth_ptr, q_row, K, inverse, HAS_SMOOTH: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """Writes the int8 row ``q_row`` of the row at ``x_row`` (scaled by ``inverse``, the reciprocal of its
    scale), in steps of BLOCK_K elements."""
    offs = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        xs = _load_smoothed(x_row + k0 + offs, smooth_ptr + k0 + offs, mask, HAS_SMOOTH)
        tl.store(q_row + k0 + offs, _round_to_int8(xs * inverse), mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    """One program per row: amax over the row, then its fp32 scale and the int8 row. ONE_TILE (K <=
    BLOCK_K) keeps the row in registers; otherwise the row is read twice (the second time from L2).
    LAUNCH_DEPENDENTS lets a GEMM launched with programmatic dependent launch start (and wait) while
    the last programs here still run. (Several rows per program measured slower: run 11 of the log.)"""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        mask = offs < K
        xs = _load_smoothed(x_row + offs, smooth_ptr + offs, mask, HAS_SMOOTH)
        scale, inverse = _row_scale(tl.max(tl.abs(xs), axis=0))
        tl.store(q_row + offs, _round_to_int8(xs * inverse), mask=mask)
    else:
        scale, inverse = _row_scale_of(x_row, smooth_ptr, K, HAS_SMOOTH, BLOCK_K)
        _store_quantized_row(x_row, smooth_ptr, q_row, K, inverse, HAS_SMOOTH, BLOCK_K)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _tile_coords(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block) in grouped order: GROUP_M row blocks sweep the column
    blocks together, so weight tiles are reused from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group_size = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile_id // group_size) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile_id % group_size) % group_rows, (tile_id % group_size) // group_rows


@triton.jit
def _epilogue(acc, a_scale, b_scale_ptr, bias_ptr, cols, HAS_BIAS: tl.constexpr):
    """int32 acc -> fp32 acc * a_scale[:, None] * b_scale[cols][None, :] (+ bias[cols]); cols in range."""
    out = acc.to(tl.float32) * a_scale[:, None] * tl.load(b_scale_ptr + cols)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    return out


@triton.jit
def _gate_row(gate_ptr, gate_stride, first_row, off_m, rows_per_gate, cols):
    """fp32 gate[cols] of the sample that tile rows from ``first_row + off_m`` belong to (gate [B, N] with
    row stride ``gate_stride``, ``rows_per_gate`` rows per sample; a tile never straddles two)."""
    return tl.load(gate_ptr + ((first_row + off_m) // rows_per_gate) * gate_stride + cols).to(tl.float32)


@triton.jit
def _write_tile(desc, offsets, value, ACCUMULATE: tl.constexpr, IN_L2: tl.constexpr):
    """Store ``value`` (already in the descriptor's dtype) at ``offsets``, or with ACCUMULATE add it to the
    tile there. IN_L2: the add is one TMA reduce-add (sm_90), which reads and writes the tile in L2
    without a trip through registers; else a TMA load, add and store (the interpreter has no TMA reduce).
    A tile has one owner, so no races."""
    if not ACCUMULATE:
        desc.store(offsets, value)
    elif IN_L2:
        desc.atomic_add(offsets, value)
    else:
        desc.store(offsets, (desc.load(offsets).to(tl.float32) + value.to(tl.float32)).to(desc.dtype))


@triton.jit
def _load_a_tile(a_ptrs, smooth_ptrs, k_mask, EVEN_K: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    if EVEN_K:
        a = tl.load(a_ptrs).to(tl.float32)
    else:
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        a = tl.math.div_rn(a, tl.load(smooth_ptrs, mask=k_mask, other=1.0)[None, :])
    return a


@triton.jit
def _prefetch_to_l2(row_ptrs, num_bytes, LINE_BYTES: tl.constexpr, STEP_BYTES: tl.constexpr):
    """Asks L2 for the first ``num_bytes`` of each row at ``row_ptrs`` (one int8 pointer per row), one
    prefetch per LINE_BYTES (a hint: nothing waits for it)."""
    cols = tl.arange(0, STEP_BYTES // LINE_BYTES) * LINE_BYTES
    for k0 in range(0, num_bytes, STEP_BYTES):
        addresses = (row_ptrs[:, None] + tl.minimum(k0 + cols, num_bytes - 1)[None, :]).to(tl.int64,
                                                                                        bitcast=True)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [addresses],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, smooth_ptr, gate_ptr, out_ptr,
    M, N, K, stride_am, stride_bn, stride_om, gate_stride, rows_per_gate, first_row,
    QUANTIZE_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr,
    GATED_ADD: tl.constexpr, WAIT_FOR_PRODUCER: tl.constexpr, PREFETCH_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = (q(A) @ B.T) * a_scale[:, None] * b_scale[None, :] (+ bias), B int8 [N, K].

    QUANTIZE_A=False: A is int8 [M, K] and a_scale its fp32 row scales.
    QUANTIZE_A=True: A is the float activation; this program computes its rows' scales over the whole
    K (smoothing included), then quantizes each A tile on load (a_scale_ptr is unused). On load it
    multiplies by the reciprocal of the row scale (one FMUL instead of an IEEE division per element),
    which can move a value sitting within one ulp of a .5 tie to the other integer.
    WAIT_FOR_PRODUCER: launched with programmatic dependent launch; no access to A or its scales
    before the previous kernel in the stream (the quantization) has finished.
    PREFETCH_K (with WAIT_FOR_PRODUCER; 0: off): while waiting, ask L2 for this program's first
    PREFETCH_K weight columns (what the K loop's pipeline loads first), which do not depend on the
    producer: at small M the quantization kernel's latency otherwise comes before any weight traffic.
    GATED_ADD: out is a residual [M, N] updated in place, out += gate[sample] * (the result above), the
    product rounded to out's dtype before the add (gate [B, N], row stride gate_stride; rows
    first_row + r of the whole residual belong to sample (first_row + r) // rows_per_gate).
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read a valid row instead (wrapped); their results are masked at the store.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    if WAIT_FOR_PRODUCER:
        if PREFETCH_K:
            _prefetch_to_l2(b_ptr + rows_b * stride_bn, tl.minimum(K, PREFETCH_K), 128, 1024)
        gdc_wait()
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[:, None] * stride_bn + offs_k[None, :]
    smooth_ptrs = smooth_ptr + offs_k

    if QUANTIZE_A:
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k_step in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k_step * BLOCK_K
            a = _load_a_tile(a_ptrs + k_step * BLOCK_K, smooth_ptrs + k_step * BLOCK_K, k_mask,
                             EVEN_K, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
        a_scale, a_inv_scale = _row_scale(amax)
    else:
        a_scale = tl.load(a_scale_ptr + rows_a)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_step in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k_step * BLOCK_K
        if QUANTIZE_A:
            a = _load_a_tile(a_ptrs, smooth_ptrs, k_mask, EVEN_K, HAS_SMOOTH)
            a = _round_to_int8(a * a_inv_scale[:, None])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
        if EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=k_mask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        smooth_ptrs += BLOCK_K

    out = _epilogue(acc, a_scale, b_scale_ptr, bias_ptr, rows_b, HAS_BIAS)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_dtype = out_ptr.dtype.element_ty
    if GATED_ADD:
        gate = _gate_row(gate_ptr, gate_stride, first_row, pid_m * BLOCK_M, rows_per_gate, rows_b)
        gated = (out * gate[None, :]).to(out_dtype)
        out = gated.to(tl.float32) + tl.load(out_ptrs, mask=out_mask).to(tl.float32)
    tl.store(out_ptrs, out.to(out_dtype), mask=out_mask)




@triton.jit
def _w8a8_gemm_tma_kernel(
    a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr,
    M, N, K, num_programs, gate_stride, rows_per_gate, first_row,
    HAS_BIAS: tl.constexpr, GATED_ADD: tl.constexpr, ADD_IN_L2: tl.constexpr, WAIT_FOR_PRODUCER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
):
    """Persistent variant of the int8-A GEMM for Hopper: tensor-memory-accelerator (TMA) descriptor
    loads/stores (out-of-range tiles are zero-filled on load and clipped on store, so no masks), one
    program per SM looping over output tiles. SPLIT_EPILOGUE stores each tile in two column halves to
    halve the epilogue's shared-memory staging (room for one more pipeline stage). WAIT_FOR_PRODUCER and
    GATED_ADD (out_desc is then the residual; ADD_IN_L2: see ``_write_tile``) as in the pointer GEMM."""
    if WAIT_FOR_PRODUCER:
        gdc_wait()
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _tma_gemm_tile(a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, pid_m, pid_n,
                       M, N, K, gate_stride, rows_per_gate, first_row, HAS_BIAS, GATED_ADD, ADD_IN_L2,
                       BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_EPILOGUE)


@triton.jit
def _tma_gemm_tile(
    a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, pid_m, pid_n,
    M, N, K, gate_stride, rows_per_gate, first_row,
    HAS_BIAS: tl.constexpr, GATED_ADD: tl.constexpr, ADD_IN_L2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr,
):
    """Output tile (pid_m, pid_n) of ``_w8a8_gemm_tma_kernel``: the full-K int32 dot product, epilogue and
    store."""
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_step in range(tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k_step * BLOCK_K])
        b = b_desc.load([off_n, k_step * BLOCK_K])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = (off_n + tl.arange(0, BLOCK_N)) % N  # clipped columns read a valid scale; not stored
    a_scale = tl.load(a_scale_ptr + rows % M)
    out = _epilogue(acc, a_scale, b_scale_ptr, bias_ptr, cols, HAS_BIAS)
    if GATED_ADD:
        out *= _gate_row(gate_ptr, gate_stride, first_row, off_m, rows_per_gate, cols)[None, :]
    out = out.to(out_desc.dtype)
    if SPLIT_EPILOGUE:
        left, right = tl.split(tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _write_tile(out_desc, [off_m, off_n], left, GATED_ADD, ADD_IN_L2)
        _write_tile(out_desc, [off_m, off_n + BLOCK_N // 2], right, GATED_ADD, ADD_IN_L2)
    else:
        _write_tile(out_desc, [off_m, off_n], out, GATED_ADD, ADD_IN_L2)


@triton.jit
def _w8a8_gemv_kernel(
    x_ptr, b_ptr, b_scale_ptr, bias_ptr, smooth_ptr, out_ptr,
    N, K, stride_xm, stride_bn, stride_om,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, AMAX_BLOCK: tl.constexpr,
    PREFETCH_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[row, cols] for one activation row (program_id(1)) and BLOCK_N weight rows (program_id(0)):
    the row's amax, scale and int8 values exactly as ``_quantize_rows_kernel`` computes them (compiled
    without FMA contraction, as that kernel), then int32 dot products on CUDA cores and the epilogue in
    the reference's order. One launch and no tensor-core tile padding: for M of a few rows, where the
    layer is weight streaming plus fixed latency. PREFETCH_WEIGHTS: first ask L2 for this program's whole
    weight slice, so that it streams in while the row's amax is computed."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_b = (offs_n % N).to(tl.int64)  # out-of-range columns read a valid row; not stored
    b_rows = b_ptr + rows_b * stride_bn
    if PREFETCH_WEIGHTS:
        _prefetch_to_l2(b_rows, K, 128, 1024)
    # Two weight tiles in flight (the compiler does not pipeline this loop): the first is loaded before
    # the amax pass, which it does not depend on, and each step loads the next tile before using its own.
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = b_rows[:, None] + offs_k[None, :]
    w_next = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    scale, inverse = _row_scale_of(x_row, smooth_ptr, K, HAS_SMOOTH, AMAX_BLOCK)
    acc = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        w = w_next
        w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=(k0 + BLOCK_K + offs_k < K)[None, :], other=0)
        k_mask = k0 + offs_k < K
        xs = _load_smoothed(x_row + k0 + offs_k, smooth_ptr + k0 + offs_k, k_mask, HAS_SMOOTH)
        q = _round_to_int8(xs * inverse).to(tl.int32)
        acc += tl.sum(w.to(tl.int32) * q[None, :], axis=1)
    out = acc.to(tl.float32) * scale * tl.load(b_scale_ptr + rows_b)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows_b).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


# How a config computes the product:
#   "int8":  _quantize_rows_kernel writes int8 A + row scales, then the pointer GEMM (any GPU);
#   "tma":   same quantization, then the persistent TMA GEMM (Hopper; needs 16-byte aligned rows);
#   "fused": the pointer GEMM alone, quantizing A on load with row scales it computes itself: one launch
#            (less host time), but every program re-reads and re-quantizes its rows, so it can only win
#            at small M;
#   "gemv":  _w8a8_gemv_kernel alone: one launch, CUDA-core dot products, for M <= GEMV_MAX_M rows
#            (block_m is 1: each program takes one row).
# (A fourth variant, a scale-only pass followed by quantize-on-load in the GEMM, measured 3.5x slower
# than "int8" at M=4608 on the H100 and was dropped; see docs/kernels.md.)
KINDS = ("int8", "tma", "fused", "gemv")
ONE_LAUNCH_KINDS = ("fused", "gemv")  # no separate quantization kernel


class GatedAdd(NamedTuple):
    """A GEMM epilogue that updates ``residual`` [M, N] in place instead of writing a new tensor:
    residual[r] += gate[r // rows_per_gate] * result[r], the product rounded to the residual's dtype
    before the add (what a DiT block's ``x = x + gate * linear(h)`` needs). gate: [B, N], N contiguous,
    any float dtype; residual: N contiguous, 16-byte aligned rows; a GEMM tile never spans two samples
    (``tiles_within_samples``)."""

    gate: torch.Tensor
    rows_per_gate: int
    residual: torch.Tensor


def tiles_within_samples(config: GemmConfig, samples: int, rows_per_gate: int) -> bool:
    """Whether every output tile of ``config`` (and of its tail) lies in one sample of ``samples``
    blocks of ``rows_per_gate`` rows, so one gate row serves it (tail launches start on a main tile
    boundary, a multiple of their own block_m)."""
    return samples == 1 or all(rows_per_gate % part.block_m == 0 for part in config.launches())


@dataclass(frozen=True)
class GemmConfig:
    """Launch configuration of the W8A8 GEMM (see KINDS).

    ``tail``: where this config's output tiles fill the persistent grid's last wave only partly, the
    rows past the last full wave run in a second launch with the tail's (smaller) tiles, so fewer SMs
    idle at the end (see ``tail_start_row``). Every output element is still one tile's full-K dot
    product, so the result is bit-identical to the config without a tail.
    """

    kind: str
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_epilogue: bool = False
    tail: GemmConfig | None = None
    # "int8" with programmatic dependent launch, or "gemv": see _w8a8_gemm_kernel, _w8a8_gemv_kernel
    prefetch_weights: bool = False

    def operand_smem_bytes(self) -> int:
        """Shared memory of the pipelined operand tiles, counting a float A tile where A is quantized
        on load (the compiler may add epilogue scratch on top)."""
        a_bytes = 2 if self.kind == "fused" else 1
        return self.num_stages * (self.block_m * a_bytes + self.block_n) * self.block_k

    def launches(self) -> tuple[GemmConfig, ...]:
        """The configs of the kernels this config may launch (itself, then its tail's), tails removed."""
        if self.tail is None:
            return (self,)
        return (replace(self, tail=None), *self.tail.launches())

    @classmethod
    def from_dict(cls, entries: dict) -> GemmConfig:
        """Inverse of ``dataclasses.asdict`` (the autotune cache's JSON form)."""
        tail = entries.get("tail")
        return cls(**{**entries, "tail": cls.from_dict(tail) if tail is not None else None})


# Shared memory per block that Triton may use (opt-in maximum), by compute capability.
SMEM_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
QUANT_ONE_TILE_MAX_K = 16384  # rows up to this long are quantized from registers in one pass
SMALL_M_MAX = 64  # rows up to which weight streaming (narrow tiles) dominates
GEMV_MAX_M = 4  # rows up to which "gemv" configs are candidates (CUDA-core work grows with M)
GEMV_AMAX_BLOCK = 4096  # row elements per amax step of the gemv kernel (32 fp32 per thread with 4 warps)
MID_M_MAX = 1024  # rows up to which smaller output tiles keep all SMs busy

# Interpreter (CPU tests): big tiles, one stage; its cost grows with the number of tiles, not FLOPs.
INTERPRETER_CONFIGS = {
    "small": GemmConfig("int8", 16, 64, 64, 8, 4, 1),
    "mid": GemmConfig("int8", 64, 64, 64, 8, 4, 1),
    "large": GemmConfig("int8", 64, 64, 64, 8, 4, 1),
}

# Hopper lists are pruned to the configs that won (or came within a few percent) somewhere in the H100
# sweeps (bench/results/bench_w8a8_layers_*sweep*.json), plus one one-launch "fused" config, which never
# won on GPU time there but saves a launch; Ampere/Ada lists are chosen to fit 99 KB of shared memory.
_SMALL_M_CONFIGS = [  # weight streaming: narrow N tiles so that enough programs run, long K tiles
    GemmConfig("int8", 16, 64, 256, 1, 4, 4),
    GemmConfig("int8", 16, 32, 256, 1, 4, 4),
    GemmConfig("int8", 16, 16, 256, 1, 4, 4),
    GemmConfig("int8", 32, 32, 256, 1, 4, 4),
    GemmConfig("fused", 16, 32, 256, 1, 4, 4),
    GemmConfig("int8", 16, 64, 256, 1, 4, 4, prefetch_weights=True),
    GemmConfig("int8", 16, 32, 256, 1, 4, 4, prefetch_weights=True),
    # block_m 1 (one row per program), block_n weight rows, K steps of block_k; for M <= GEMV_MAX_M. The
    # H200 sweep (bench_w8a8_layers_m1_gemv2_run15) had 8x1024 best on 12 of 15 layers at M = 1, the
    # prefetching 16x512 on one; 4x2048, 8x2048 and 16x1024 (more bytes per step) lost everywhere.
    GemmConfig("gemv", 1, 8, 1024, 1, 4, 1),
    GemmConfig("gemv", 1, 16, 512, 1, 4, 1, prefetch_weights=True),
    GemmConfig("gemv", 1, 16, 512, 1, 4, 1),
    GemmConfig("gemv", 1, 8, 512, 1, 4, 1),
]
# The Hopper workhorse (128x256 tiles), and the same with each candidate tail: smaller tiles for the rows
# past its last full wave (4608x3072 outputs are 432 such tiles on 132 SMs, 3.3 waves).
_HOPPER_WIDE = GemmConfig("tma", 128, 256, 128, 8, 8, 4, split_epilogue=True)
_HOPPER_WIDE_WITH_TAILS = [
    replace(_HOPPER_WIDE, tail=tail) for tail in (
        GemmConfig("tma", 128, 128, 128, 8, 4, 5),
        GemmConfig("tma", 64, 256, 128, 8, 4, 4),
        GemmConfig("tma", 64, 128, 128, 8, 4, 4),
    )
]
_MID_M_CONFIGS = {
    "ampere": [
        GemmConfig("int8", 64, 128, 128, 8, 4, 3),
        GemmConfig("int8", 128, 128, 64, 8, 4, 4),
        GemmConfig("int8", 64, 64, 128, 8, 4, 4),
        GemmConfig("int8", 64, 64, 256, 8, 4, 3),
    ],
    "hopper": [
        _HOPPER_WIDE,
        GemmConfig("tma", 128, 128, 128, 8, 4, 5),
        GemmConfig("tma", 64, 128, 128, 8, 4, 4),
        GemmConfig("int8", 64, 128, 128, 8, 4, 4),
        *_HOPPER_WIDE_WITH_TAILS,
    ],
}
_LARGE_M_CONFIGS = {
    "ampere": [
        GemmConfig("int8", 128, 256, 64, 8, 8, 3),
        GemmConfig("int8", 128, 128, 64, 8, 4, 4),
        GemmConfig("int8", 128, 128, 128, 8, 8, 3),
        GemmConfig("int8", 256, 128, 64, 8, 8, 3),
    ],
    "hopper": [
        _HOPPER_WIDE,
        GemmConfig("tma", 128, 256, 128, 8, 8, 3, split_epilogue=True),
        GemmConfig("tma", 256, 128, 128, 8, 8, 3, split_epilogue=True),
        GemmConfig("tma", 64, 256, 128, 8, 4, 4),
        *_HOPPER_WIDE_WITH_TAILS,
    ],
}


def m_regime(m: int) -> str:
    """"small" (M <= 64), "mid" (M <= 1024) or "large": which config list serves M rows."""
    return "small" if m <= SMALL_M_MAX else "mid" if m <= MID_M_MAX else "large"


def arch_key(capability: tuple[int, int]) -> int:
    """Compute capability (major, minor) -> the integer key of the config tables, e.g. (8, 6) -> 86."""
    return capability[0] * 10 + capability[1]


def candidate_configs(cc: int, regime: str) -> list[GemmConfig]:
    """Configs worth trying for an architecture (compute capability as an int, e.g. 86) and an M regime.

    The first entry is the default used without autotuning. All fit the architecture's shared memory.
    "tma" configs are listed for sm_90 only; callers drop them where the tensors are not TMA-aligned.
    Weight-prefetching "int8" configs are listed where GEMMs wait for the quantization with programmatic
    dependent launch (sm_90 with a Triton that has it): elsewhere they would repeat the plain ones.
    "gemv" configs are listed for every architecture; they only serve M <= GEMV_MAX_M.
    """
    family = "hopper" if cc >= 90 else "ampere"
    configs = {"small": _SMALL_M_CONFIGS, "mid": _MID_M_CONFIGS[family],
               "large": _LARGE_M_CONFIGS[family]}[regime]
    limit = SMEM_LIMIT_BYTES.get(cc, 99 * 1024)
    dependent_launch = cc >= 90 and HAS_PDL
    # Leave room for the epilogue's layout-conversion scratch the compiler adds on top of the operands.
    return [c for c in configs if (dependent_launch or not c.prefetch_weights or c.kind == "gemv")
            and all(part.operand_smem_bytes() <= limit - 16 * 1024
                    and (part.kind != "tma" or TensorDescriptor is not None) for part in c.launches())]


def tail_start_row(m: int, n: int, config: GemmConfig, slots: int) -> int:
    """First output row that ``config.tail`` computes, m where it computes none.

    The main launch keeps the row blocks whose tiles (``config``'s, ``n`` output columns) fill whole
    waves of ``slots`` concurrent programs; the rows below them go to the tail (0 where even one wave is
    not full: then the tail's tiles run everything).
    """
    if config.tail is None:
        return m
    tiles_n = ceil_div(n, config.block_n)
    full_wave_tiles = ceil_div(m, config.block_m) * tiles_n // slots * slots
    return min(m, full_wave_tiles // tiles_n * config.block_m)


def tma_compatible(weight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether "tma" configs can run: TMA descriptors need 16-byte aligned bases and row strides, i.e.
    an aligned weight with K % 16 == 0 (the int8 activation and the output are fresh allocations)
    and output rows of a multiple of 16 bytes."""
    n = weight.shape[0]
    return (weight.data_ptr() % 16 == 0 and weight.stride(0) % 16 == 0 and weight.shape[1] % 16 == 0
            and (n * out_dtype.itemsize) % 16 == 0)


@functools.cache
def _device_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _properties(device: torch.device):
    return _device_properties(device.index if device.index is not None else torch.cuda.current_device())


def program_slots(device: torch.device) -> int:
    """Programs of the persistent GEMM that run at once: one per SM (4 in the interpreter)."""
    return 4 if INTERPRETED else _properties(device).multi_processor_count


def uses_pdl(device: torch.device) -> bool:
    """Whether GEMMs on ``device`` are launched with programmatic dependent launch: the GPU schedules
    them while the kernel before (the activation quantization) still runs, and they wait for its
    results in ``gdc_wait``, which hides the launch gap between the two. Needs sm_90+, a Triton with
    ``launch_pdl`` and no interpreter; DIT_QUANT_PDL=0 switches it off."""
    return (USE_PDL and HAS_PDL and not INTERPRETED and device.type == "cuda"
            and _properties(device).major >= 9)


def _check_launchable(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "DiT Quant: the Triton W8A8 kernels run on CPU tensors only in the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton); use backend='torch' on CPU"
        )


def quantize_rows_triton(
    x2d: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-row int8 quantization. x2d [M, K] float with K contiguous; smooth fp32 [K] or None.

    Returns (q int8 [M, K], scale fp32 [M]).
    """
    _check_launchable(x2d)
    q, scale = _quantized_outputs(x2d)
    if x2d.shape[0]:
        _prepare_quantize(x2d, smooth, q, scale)()
    return q, scale


def _quantized_outputs(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x2d.shape
    return (torch.empty((m, k), dtype=torch.int8, device=x2d.device),
            torch.empty((m,), dtype=torch.float32, device=x2d.device))


def _prepare_quantize(x2d, smooth, q, scale, num_warps: int | None = None) -> Callable[[], None]:
    """The quantize kernel's launch; ``num_warps`` overrides the rule below (the benchmark's sweep)."""
    return _quantize_rows_launcher.prepare(*_quantize_spec(x2d, smooth, q, scale, num_warps))


def _quantize_spec(x2d, smooth, q, scale, num_warps: int | None = None) -> tuple:
    """(grid, args, constants) of the quantize kernel."""
    m, k = x2d.shape
    block_k = min(next_power_of_2(k), QUANT_ONE_TILE_MAX_K)
    # 8 warps for long rows: 4608x15360 ran 58 us against 65 us with 4 (H200, bench_quantize_rows
    # --sweep-warps); rows up to 4096 are as fast with 2 or 4 warps and slower with more.
    if num_warps is None:
        num_warps = 8 if block_k >= 8192 else 4
    return ((m,), _quantize_args(x2d, smooth, q, scale),
            _quantize_constants(smooth is not None, block_k, k <= block_k, num_warps, uses_pdl(x2d.device)))


def _quantize_args(x2d, smooth, q, scale) -> tuple:
    k = x2d.shape[1]
    return (x2d, smooth if smooth is not None else scale, q, scale, k, x2d.stride(0), k)


@functools.cache
def _quantize_constants(has_smooth: bool, block_k: int, one_tile: bool, num_warps: int,
                        launch_dependents: bool) -> tuple:
    # enable_fp_fusion=False: x * inverse must round before the rounding trick's add, as in torch
    return (("HAS_SMOOTH", has_smooth), ("BLOCK_K", block_k), ("ONE_TILE", one_tile),
            ("LAUNCH_DEPENDENTS", launch_dependents), ("num_warps", num_warps), ("enable_fp_fusion", False))


def _tile_constants(config: GemmConfig) -> tuple:
    """The constexprs and compile options both GEMM kernels take from a config."""
    return (("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n), ("BLOCK_K", config.block_k),
            ("GROUP_M", config.group_m), ("num_warps", config.num_warps), ("num_stages", config.num_stages))


def _dependent_launch_constants(pdl: bool) -> tuple:
    """The GEMMs' constexpr and launch option of programmatic dependent launch (see ``uses_pdl``)."""
    return (("WAIT_FOR_PRODUCER", True), ("launch_pdl", True)) if pdl else (("WAIT_FOR_PRODUCER", False),)


@functools.cache
def _pointer_gemm_constants(config: GemmConfig, quantize_a: bool, has_bias: bool, has_smooth: bool,
                            even_k: bool, pdl: bool, gated: bool = False) -> tuple:
    return (("QUANTIZE_A", quantize_a), ("HAS_BIAS", has_bias), ("HAS_SMOOTH", has_smooth),
            ("EVEN_K", even_k), ("GATED_ADD", gated), *_dependent_launch_constants(pdl),
            ("PREFETCH_K", config.block_k * config.num_stages if config.prefetch_weights and pdl else 0),
            *_tile_constants(config))


@functools.cache
def _tma_gemm_constants(config: GemmConfig, has_bias: bool, pdl: bool, gated: bool) -> tuple:
    # the interpreter has no TMA reduce: there the residual tile is loaded, added and stored
    return (("HAS_BIAS", has_bias), ("GATED_ADD", gated), ("ADD_IN_L2", not INTERPRETED),
            ("SPLIT_EPILOGUE", config.split_epilogue),
            *_dependent_launch_constants(pdl), *_tile_constants(config))


@functools.cache
def _gemv_constants(config: GemmConfig, has_bias: bool, has_smooth: bool, amax_block: int) -> tuple:
    # enable_fp_fusion=False: quantized values as _quantize_rows_kernel's, the epilogue as the reference's;
    # no prefetch in the interpreter (no inline assembly there)
    return (("HAS_BIAS", has_bias), ("HAS_SMOOTH", has_smooth), ("AMAX_BLOCK", amax_block),
            ("PREFETCH_WEIGHTS", config.prefetch_weights and not INTERPRETED),
            ("BLOCK_N", config.block_n), ("BLOCK_K", config.block_k), ("num_warps", config.num_warps),
            ("num_stages", config.num_stages), ("enable_fp_fusion", False))


_quantize_rows_launcher = CachedLauncher(_quantize_rows_kernel)
_pointer_gemm_launcher = CachedLauncher(_w8a8_gemm_kernel)
_tma_gemm_launcher = CachedLauncher(_w8a8_gemm_tma_kernel)
_gemv_launcher = CachedLauncher(_w8a8_gemv_kernel)


def _pointer_gemm_spec(config, a, a_scale, weight, weight_scale, bias, smooth, out,
                       gated: GatedAdd | None = None, first_row: int = 0) -> tuple:
    """(grid, args, constants) of the pointer GEMM; without ``a_scale``, ``a`` is the float activation,
    quantized on load. With ``gated``, ``out`` is the residual rows from ``first_row`` on."""
    m, k = a.shape
    n = weight.shape[0]
    return (
        (ceil_div(m, config.block_m) * ceil_div(n, config.block_n),),
        _pointer_gemm_args(a, a_scale, weight, weight_scale, bias, smooth, out, gated, first_row),
        # quantizing on load (a_scale None): the kernel before is not ours, nothing to overlap with
        _pointer_gemm_constants(config, a_scale is None, bias is not None, smooth is not None,
                                k % config.block_k == 0, a_scale is not None and uses_pdl(a.device),
                                gated is not None),
    )


def _gate_args(gated: GatedAdd | None, first_row: int, placeholder: torch.Tensor) -> tuple:
    """The kernels' (gate_ptr, gate_stride, rows_per_gate, first_row), placeholders without ``gated``."""
    if gated is None:
        return placeholder, 0, 1, 0
    return gated.gate, gated.gate.stride(0), gated.rows_per_gate, first_row


def _pointer_gemm_args(a, a_scale, weight, weight_scale, bias, smooth, out,
                       gated: GatedAdd | None = None, first_row: int = 0) -> tuple:
    m, k = a.shape
    gate, gate_stride, rows_per_gate, first_row = _gate_args(gated, first_row, weight_scale)
    return (a, weight, a_scale if a_scale is not None else weight_scale, weight_scale,
            bias if bias is not None else weight_scale, smooth if smooth is not None else weight_scale, gate,
            out, m, weight.shape[0], k, a.stride(0), weight.stride(0), out.stride(0), gate_stride,
            rows_per_gate, first_row)


def _tma_gemm_spec(config, q, a_scale, weight, weight_scale, bias, out, gated: GatedAdd | None = None,
                   first_row: int = 0) -> tuple:
    """(grid, args, constants) of the persistent TMA GEMM."""
    tiles = ceil_div(q.shape[0], config.block_m) * ceil_div(weight.shape[0], config.block_n)
    num_programs = min(tiles, program_slots(q.device))
    args = _tma_gemm_args(config, q, a_scale, weight, weight_scale, bias, out, num_programs, gated, first_row)
    return (num_programs,), args, _tma_gemm_constants(config, bias is not None, uses_pdl(q.device),
                                                      gated is not None)


def _tma_gemm_args(config, q, a_scale, weight, weight_scale, bias, out, num_programs: int,
                   gated: GatedAdd | None = None, first_row: int = 0) -> tuple:
    out_block_n = config.block_n // 2 if config.split_epilogue else config.block_n
    gate, gate_stride, rows_per_gate, first_row = _gate_args(gated, first_row, weight_scale)
    return (TensorDescriptor.from_tensor(q, [config.block_m, config.block_k]),
            TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k]),
            TensorDescriptor.from_tensor(out, [config.block_m, out_block_n]),
            a_scale, weight_scale, bias if bias is not None else weight_scale, gate,
            q.shape[0], weight.shape[0], q.shape[1], num_programs, gate_stride, rows_per_gate, first_row)


def _one_launch_args(kind: str, x2d, weight, weight_scale, bias, smooth, out) -> tuple:
    """The runtime arguments of a ONE_LAUNCH_KINDS kernel."""
    if kind == "gemv":
        return (x2d, weight, weight_scale, bias if bias is not None else weight_scale,
                smooth if smooth is not None else weight_scale, out,
                weight.shape[0], x2d.shape[1], x2d.stride(0), weight.stride(0), out.stride(0))
    return _pointer_gemm_args(x2d, None, weight, weight_scale, bias, smooth, out)


def _one_launch_spec(config, x2d, weight, weight_scale, bias, smooth, out) -> tuple:
    """(launcher, grid, args, constants) of a ONE_LAUNCH_KINDS config's single kernel."""
    if config.kind != "gemv":
        return (_pointer_gemm_launcher,
                *_pointer_gemm_spec(config, x2d, None, weight, weight_scale, bias, smooth, out))
    m, k = x2d.shape
    constants = _gemv_constants(config, bias is not None, smooth is not None,
                                min(next_power_of_2(k), GEMV_AMAX_BLOCK))
    return (_gemv_launcher, (ceil_div(weight.shape[0], config.block_n), m),
            _one_launch_args("gemv", x2d, weight, weight_scale, bias, smooth, out), constants)


def w8a8_linear_triton(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    config: GemmConfig,
) -> torch.Tensor:
    """W8A8 linear through the Triton kernels with a given config (see ``candidate_configs``).

    x2d: [M, K] float, K contiguous; weight int8 [N, K]; weight_scale fp32 [N]; bias [N] or None;
    smooth fp32 [K] or None. Returns [M, N] in x2d.dtype. A "tma" config needs ``tma_compatible``
    tensors.
    """
    _check_launchable(x2d)
    out = torch.empty((x2d.shape[0], weight.shape[0]), dtype=x2d.dtype, device=x2d.device)
    if x2d.shape[0] == 0:
        return out
    if config.kind in ONE_LAUNCH_KINDS:
        launcher, *spec = _one_launch_spec(config, x2d, weight, weight_scale, bias, smooth, out)
        launcher.prepare(*spec)()
        return out
    q, scale = _quantized_outputs(x2d)
    gemm = _prepare_gemm(config, q, scale, weight, weight_scale, bias, out)  # before quantizing: no gap
    _prepare_quantize(x2d, smooth, q, scale)()
    gemm()
    return out


def gemm_row_parts(config: GemmConfig, m: int, n: int, slots: int, first_row: int = 0) -> list[tuple]:
    """The GEMM launches of ``config`` over ``m`` rows: ``(config, first row, end row)`` each, the main
    launch over the row blocks that fill whole waves of ``slots`` programs, then its tail's launches over
    the rest (see ``tail_start_row``)."""
    start = m if config.tail is None else tail_start_row(m, n, config, slots)
    if start >= m:
        return [(config, first_row, first_row + m)]
    tail = gemm_row_parts(config.tail, m - start, n, slots, first_row + start)
    return tail if start == 0 else [(config, first_row, first_row + start), *tail]


def _gemm_launch_specs(config, q, scale, weight, weight_scale, bias, out, gated: GatedAdd | None = None):
    """Per launch of the GEMM of int8 ``q`` as ``config`` runs it (``gemm_row_parts``): the launch's
    config, first and end row, launcher, grid, args and constants. With ``gated``, ``out`` is the
    residual it updates."""
    m = q.shape[0]
    for part, start, stop in gemm_row_parts(config, m, weight.shape[0], program_slots(q.device)):
        part_q, part_scale, part_out = _row_slices(start, stop, m, q, scale, out)
        if part.kind == "tma":
            spec = _tma_gemm_launcher, *_tma_gemm_spec(part, part_q, part_scale, weight, weight_scale, bias,
                                                       part_out, gated, start)
        else:
            spec = _pointer_gemm_launcher, *_pointer_gemm_spec(part, part_q, part_scale, weight, weight_scale,
                                                               bias, None, part_out, gated, start)
        yield part, start, stop, *spec


def _gemm_args(config, q, scale, weight, weight_scale, bias, out, num_programs: int,
               gated: GatedAdd | None, first_row: int) -> tuple:
    """The runtime arguments of one GEMM launch (``num_programs``: the TMA kernel's grid)."""
    if config.kind == "tma":
        return _tma_gemm_args(config, q, scale, weight, weight_scale, bias, out, num_programs, gated,
                              first_row)
    return _pointer_gemm_args(q, scale, weight, weight_scale, bias, None, out, gated, first_row)


def _row_slices(start: int, stop: int, m: int, *tensors: torch.Tensor) -> tuple:
    return tensors if (start, stop) == (0, m) else tuple(t[start:stop] for t in tensors)


def _prepare_gemm(config, q, scale, weight, weight_scale, bias, out,
                  gated: GatedAdd | None = None) -> Callable[[], None]:
    """The GEMM of int8 ``q`` as ``config`` runs it: one launch, or a main and a tail launch over row
    slices (see ``gemm_row_parts``)."""
    launches = [launcher.prepare(grid, args, constants) for *_, launcher, grid, args, constants
                in _gemm_launch_specs(config, q, scale, weight, weight_scale, bias, out, gated)]
    if len(launches) == 1:
        return launches[0]

    def all_parts() -> None:
        for launch in launches:
            launch()

    return all_parts


class _BoundGemm:
    """The bound GEMM launches of one config over M rows (``gemm_row_parts``)."""

    def __init__(self, parts: list) -> None:
        self.parts = parts  # (BoundLaunch, config, first row, end row, TMA program count) per launch

    @classmethod
    def bind(cls, config, q, scale, weight, weight_scale, bias, out,
             gated: GatedAdd | None = None) -> _BoundGemm | None:
        parts = []
        for part, start, stop, launcher, grid, args, constants in _gemm_launch_specs(
                config, q, scale, weight, weight_scale, bias, out, gated):
            launch = launcher.bind(grid, args, constants)
            if launch is None:
                return None
            parts.append((launch, part, start, stop, grid[0]))
        return cls(parts)

    def arguments(self, q, scale, weight, weight_scale, bias, out,
                  gated: GatedAdd | None = None) -> list[tuple]:
        """The runtime arguments of each launch, for these tensors."""
        m = q.shape[0]
        arguments = []
        for _, config, start, stop, num_programs in self.parts:
            part_q, part_scale, part_out = _row_slices(start, stop, m, q, scale, out)
            arguments.append(_gemm_args(config, part_q, part_scale, weight, weight_scale, bias, part_out,
                                        num_programs, gated, start))
        return arguments

    def launch(self, stream: int, arguments: list[tuple]) -> None:
        for (launch, *_), args in zip(self.parts, arguments, strict=True):
            launch(stream, *args)


class LaunchPlan:
    """The launches of one W8A8 linear (``w8a8_linear_triton``) or GEMM of quantized rows
    (``int8_gemm_triton``) for one layer and one input signature, bound once (``CachedLauncher.bind``): a
    call allocates the outputs, builds the argument tuples and launches, without the per-launch
    specialization key, config lookup and launch preparation of the general path (a third of the host
    time of a public call on the H200 machine's host, run 13 of docs/kernels.md). Holds no tensors;
    built by ``build_linear_plan`` / ``build_gemm_plan``, looked up by ``linear_plan_key`` /
    ``gemm_plan_key``."""

    def __init__(self, device_index: int, out_dtype: torch.dtype, gemm: _BoundGemm | None,
                 quantize: BoundLaunch | None = None,
                 one_launch: tuple[str, BoundLaunch] | None = None) -> None:
        """``one_launch``: (kind, launch) of a ONE_LAUNCH_KINDS config, which runs instead of the
        quantize and GEMM launches."""
        self.device_index, self.out_dtype = device_index, out_dtype
        self._gemm, self._quantize, self._one_launch = gemm, quantize, one_launch

    def linear(self, x2d, weight, weight_scale, bias, smooth, stream: int) -> torch.Tensor:
        """``w8a8_linear_triton`` for tensors of the plan's key; ``stream``: the current stream of the
        plan's device."""
        out = torch.empty((x2d.shape[0], weight.shape[0]), dtype=self.out_dtype, device=x2d.device)
        if self._one_launch is not None:
            kind, launch = self._one_launch
            launch(stream, *_one_launch_args(kind, x2d, weight, weight_scale, bias, smooth, out))
            return out
        q, scale = _quantized_outputs(x2d)
        arguments = self._gemm.arguments(q, scale, weight, weight_scale, bias, out)  # before: no GPU gap
        self._quantize(stream, *_quantize_args(x2d, smooth, q, scale))
        self._gemm.launch(stream, arguments)
        return out

    def gemm(self, q, scale, weight, weight_scale, bias, stream: int,
             gated: GatedAdd | None = None) -> torch.Tensor:
        """``int8_gemm_triton`` (with ``gated``: ``int8_gemm_gated_add_triton``, returning the residual)
        for tensors of the plan's key."""
        out = _gemm_output(q, weight, self.out_dtype, gated)
        self._gemm.launch(stream, self._gemm.arguments(q, scale, weight, weight_scale, bias, out, gated))
        return out


def _layer_key(weight, weight_scale, bias) -> tuple:
    # addresses (hence alignments), shapes and dtypes of the layer tensors, and the launch switches
    return (weight.data_ptr(), weight.shape, weight.stride(0), weight_scale.data_ptr(),
            None if bias is None else (bias.data_ptr(), bias.dtype), USE_PDL, triton_launch.DIRECT_LAUNCH)


def linear_plan_key(x2d, weight, weight_scale, bias, smooth) -> tuple:
    """What a linear ``LaunchPlan`` depends on: the input's shape, row stride, dtype, 16-byte alignment and
    device, and the layer (``_layer_key``, smoothing vector). Fresh outputs are always aligned, so equal
    keys specialize every launch the same way."""
    return (x2d.shape, x2d.stride(0), x2d.dtype, x2d.data_ptr() % 16, x2d.get_device(),
            None if smooth is None else smooth.data_ptr(), *_layer_key(weight, weight_scale, bias))


def gemm_plan_key(q, scale, weight, weight_scale, bias, out_dtype, gated: GatedAdd | None = None) -> tuple:
    """What a GEMM ``LaunchPlan`` depends on (as ``linear_plan_key``; the row scales are an input here,
    and so are the gate and the residual of a gated add, which is not a fresh allocation)."""
    gate_key = None if gated is None else (
        gated.gate.shape, gated.gate.stride(0), gated.gate.dtype, gated.gate.data_ptr() % 16,
        gated.rows_per_gate, gated.residual.stride(0), gated.residual.data_ptr() % 16)
    return (q.shape, q.stride(0), q.data_ptr() % 16, scale.data_ptr() % 16, q.get_device(), out_dtype,
            gate_key, *_layer_key(weight, weight_scale, bias))


def _can_plan(t: torch.Tensor) -> bool:
    return not INTERPRETED and t.is_cuda


def build_linear_plan(x2d, weight, weight_scale, bias, smooth, config: GemmConfig) -> LaunchPlan | None:
    """A plan of ``w8a8_linear_triton`` for these tensors and ``config``, once all of its launches have
    been compiled (after one call with them); None before or in the interpreter. Not to be built during
    graph capture, whose call ran the untuned first candidate (the dispatcher plans after the capture)."""
    if not _can_plan(x2d):
        return None
    out = torch.empty((x2d.shape[0], weight.shape[0]), dtype=x2d.dtype, device=x2d.device)
    if config.kind in ONE_LAUNCH_KINDS:
        launcher, *spec = _one_launch_spec(config, x2d, weight, weight_scale, bias, smooth, out)
        launch = launcher.bind(*spec)
        return None if launch is None else LaunchPlan(x2d.get_device(), x2d.dtype, None,
                                                      one_launch=(config.kind, launch))
    q, scale = _quantized_outputs(x2d)
    quantize = _quantize_rows_launcher.bind(*_quantize_spec(x2d, smooth, q, scale))
    gemm = _BoundGemm.bind(config, q, scale, weight, weight_scale, bias, out)
    if quantize is None or gemm is None:
        return None
    return LaunchPlan(x2d.get_device(), x2d.dtype, gemm, quantize=quantize)


def build_gemm_plan(q, scale, weight, weight_scale, bias, out_dtype, config: GemmConfig,
                    gated: GatedAdd | None = None) -> LaunchPlan | None:
    """A plan of ``int8_gemm_triton`` (or, with ``gated``, of ``int8_gemm_gated_add_triton``), as
    ``build_linear_plan``."""
    if not _can_plan(q) or q.shape[0] == 0:
        return None
    gemm = _BoundGemm.bind(config, q, scale, weight, weight_scale, bias,
                           _gemm_output(q, weight, out_dtype, gated), gated)
    return None if gemm is None else LaunchPlan(q.get_device(), out_dtype, gemm)


def _gemm_output(q, weight, out_dtype: torch.dtype, gated: GatedAdd | None) -> torch.Tensor:
    """Where a GEMM of quantized rows writes: a new [M, N] tensor, or the residual of a gated add."""
    if gated is not None:
        return gated.residual
    return torch.empty((q.shape[0], weight.shape[0]), dtype=out_dtype, device=q.device)


def _gemm_into(out, q, scale, weight, weight_scale, bias, config: GemmConfig, gated: GatedAdd | None) -> None:
    if config.kind == "gemv":
        raise ValueError(f"DiT Quant: {config} quantizes its own activation rows; the GEMM of quantized "
                         "rows takes an \"int8\", \"tma\" or \"fused\" config")
    _check_launchable(q)
    if q.shape[0]:
        _prepare_gemm(config, q, scale, weight, weight_scale, bias, out, gated)()


def int8_gemm_triton(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig,
) -> torch.Tensor:
    """The GEMM of the W8A8 linear for activations already quantized (by ``quantize_rows_triton`` or a
    fused producer): int8 q [M, K] (K contiguous) with fp32 row scales [M], int8 weight [N, K], fp32
    weight_scale [N], bias [N] or None -> [M, N] out_dtype. A "fused" config runs its tile as "int8"; a
    "gemv" config, which quantizes its rows itself, is refused (ValueError)."""
    out = _gemm_output(q, weight, out_dtype, None)
    _gemm_into(out, q, scale, weight, weight_scale, bias, config, None)
    return out


def int8_gemm_gated_add_triton(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    gated: GatedAdd,
    config: GemmConfig,
) -> None:
    """``int8_gemm_triton`` whose epilogue adds its gated result to ``gated.residual`` in place (see
    ``GatedAdd``) instead of writing a new tensor: one kernel instead of the GEMM and an elementwise
    pass. On Hopper ("tma" configs) the add is a TMA reduction in L2. The config's tiles must lie within
    samples (``tiles_within_samples``; ValueError otherwise)."""
    if not tiles_within_samples(config, gated.gate.shape[0], gated.rows_per_gate):
        raise ValueError(f"DiT Quant: {config}'s tiles span two samples of {gated.rows_per_gate} rows")
    _gemm_into(gated.residual, q, scale, weight, weight_scale, bias, config, gated)
