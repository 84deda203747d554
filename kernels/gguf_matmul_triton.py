"""Fused GGUF dequantize-and-multiply: ``y = x @ dequant(W).T + bias`` without materializing W.

Each program owns an output tile [BLOCK_M, BLOCK_N] and walks K in steps of 128 values (four 32-value
blocks, or half a K-quant super-block). Per step it loads the raw GGUF bytes of its BLOCK_N weight rows,
decodes them in registers to the activation dtype and feeds the tensor cores (``tl.dot``) directly: no
dequantized copy of the weight is ever written to memory.

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

import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import last_dim_contiguous
from .gguf_dequant_reference import BLOCK_LAYOUT
from .gguf_dequant_triton import INTERPRETED, k_scale_min, load_f16, round_to_bf16
from .triton_launch import CachedLauncher, ceil_div, next_power_of_2

FUSED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_QTYPE_ID = {name: i for i, name in enumerate(FUSED_TYPES)}
K_STEP = 128  # values of K per loop iteration
# K must be whole super-blocks for K-quants, whole steps for the others.
K_MULTIPLE = {name: 256 if name.endswith("_K") else K_STEP for name in FUSED_TYPES}
# Length of the runs of consecutive K indices in one half of a block (see the module docstring).
_RUN = {"Q8_0": 16, "Q4_0": 16, "Q4_1": 16, "Q5_0": 16, "Q5_1": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 64}


@triton.jit
def _legacy_halves(row, step, n_mask, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr):
    """Four 32-value blocks (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1) of BLOCK_N rows -> (lo, hi) float32 [BLOCK_N, 64]:
    lo[:, 16g + l] is value 32g + l of the step, hi[:, 16g + l] value 32g + 16 + l."""
    g = tl.arange(0, 4)[None, :, None]
    lane = tl.arange(0, 16)[None, None, :]
    mask = n_mask[:, None, None]
    base = row[:, :, None] + (step * 4 + g) * TYPE_SIZE  # [BN, 4, 1] byte address of each block
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
    return tl.reshape(lo, (lo.shape[0], 64)), tl.reshape(hi, (hi.shape[0], 64))


@triton.jit
def _k_quant_halves(row, step, n_mask, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr):
    """Half h = step % 2 of super-block step // 2, for BLOCK_N rows -> (lo, hi) float32 [BLOCK_N, 64].
    Q4_K/Q5_K: lo[:, 32i + l] = value 128h + 64i + l, hi = value 128h + 64i + 32 + l.
    Q6_K: lo[:, c] = value 128h + c, hi = value 128h + 64 + c."""
    base = row + (step // 2) * TYPE_SIZE  # [BN, 1]
    h = step % 2
    mask = n_mask[:, None]
    if QTYPE == 7:  # Q6_K: ql[128] | qh[64] | scales[16] int8 | d
        c = tl.arange(0, 64)[None, :]
        ql = tl.load(base + h * 64 + c, mask=mask, other=0).to(tl.int32)
        qh = tl.load(base + 128 + h * 32 + c % 32, mask=mask, other=0).to(tl.int32)
        shift = (c // 32) * 2
        q_lo = ((ql & 0xF) | (((qh >> shift) & 3) << 4)) - 32
        q_hi = ((ql >> 4) | (((qh >> (shift + 4)) & 3) << 4)) - 32
        d = load_f16(base + 208, mask)
        sc_lo = tl.load(base + 192 + h * 8 + c // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        sc_hi = tl.load(base + 196 + h * 8 + c // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        lo = (d * sc_lo.to(tl.float32)) * q_lo.to(tl.float32)
        hi = (d * sc_hi.to(tl.float32)) * q_hi.to(tl.float32)
    else:  # Q4_K: d | dmin | scales[12] | qs[128];  Q5_K: d | dmin | scales[12] | qh[32] | qs[128]
        p = 2 * h + tl.arange(0, 2)[None, :]  # the two nibble pairs of this half
        sc_lo, mn_lo = k_scale_min(base + 4, 2 * p, mask)  # [BN, 2]: sub-blocks 2p
        sc_hi, mn_hi = k_scale_min(base + 4, 2 * p + 1, mask)  # sub-blocks 2p + 1
        d = load_f16(base, mask)
        dmin = load_f16(base + 2, mask)
        lane = tl.arange(0, 32)[None, None, :]
        b3 = base[:, :, None]
        m3 = n_mask[:, None, None]
        p3 = p[:, :, None]
        qs_offset: tl.constexpr = 16 if QTYPE == 5 else 48
        byte = tl.load(b3 + qs_offset + p3 * 32 + lane, mask=m3, other=0).to(tl.int32)
        q_lo = byte & 0xF
        q_hi = byte >> 4
        if QTYPE == 6:
            qh = tl.load(b3 + 16 + lane, mask=m3, other=0).to(tl.int32)
            q_lo = q_lo | (((qh >> (2 * p3)) & 1) << 4)
            q_hi = q_hi | (((qh >> (2 * p3 + 1)) & 1) << 4)
        lo = (d * sc_lo)[:, :, None] * q_lo.to(tl.float32) - (dmin * mn_lo)[:, :, None]
        hi = (d * sc_hi)[:, :, None] * q_hi.to(tl.float32) - (dmin * mn_hi)[:, :, None]
        lo = tl.reshape(lo, (lo.shape[0], 64))
        hi = tl.reshape(hi, (hi.shape[0], 64))
    return lo, hi


@dataclass(frozen=True)
class TileConfig:
    """A launch configuration: BLOCK_M activation rows x BLOCK_N weight rows per program."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidates for autotuning and for the benchmark's sweep. Every one fits the shared memory of sm_80/86/89/90
# for every fused type (largest: Q6_K 128x128x3 and 256x128x2, 96 KB on sm_86; see tests/test_gguf_aot.py).
CANDIDATES = (
    TileConfig(16, 64, 4, 3),
    TileConfig(16, 128, 4, 3),
    TileConfig(32, 128, 4, 3),
    TileConfig(64, 128, 4, 3),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 128, 8, 3),
    TileConfig(128, 128, 8, 2),
    TileConfig(256, 128, 8, 2),
    TileConfig(128, 256, 8, 2),
)
AUTOTUNE = os.environ.get("DIT_QUANT_GGUF_AUTOTUNE") == "1" and not INTERPRETED


def default_config(m: int, capability: tuple[int, int]) -> TileConfig:
    """The tile for M activation rows without autotuning. BLOCK_M (rows sharing each decoded weight tile)
    grows with M: decoding costs ~4 ALU ops per weight value per BLOCK_M rows. Consumer Ampere/Ada
    (sm_86/sm_89) have 99 KB of shared memory per block, A100/H100 163/227 KB."""
    if m <= 16:
        return TileConfig(16, 64, 4, 3)
    if m <= 64:
        return TileConfig(32, 128, 4, 3)
    if m <= 256:
        return TileConfig(64, 128, 4, 3)
    if capability in ((8, 0), (9, 0)):
        return TileConfig(128, 128, 8, 3)
    return TileConfig(128, 128, 8, 2)


def _prune(configs, named_args, **kwargs):
    """Keep tiles no taller than twice the (bucketed) number of rows."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * named_args["M_BUCKET"])]
    return kept or configs[:1]


def _autotuned(key: list[str]):
    """With DIT_QUANT_GGUF_AUTOTUNE=1, ``triton.autotune`` over :data:`CANDIDATES` keyed on ``key``
    (the first call per shape then takes a few seconds per candidate); otherwise the plain kernel."""

    def wrap(fn):
        if not AUTOTUNE:
            return fn
        configs = [
            triton.Config(
                {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps, num_stages=c.num_stages
            )
            for c in CANDIDATES
        ]
        extra = (
            {"cache_results": True}
            if "cache_results" in inspect.signature(triton.autotune).parameters
            else {}
        )
        return triton.autotune(
            configs=configs, key=key, prune_configs_by={"early_config_prune": _prune}, **extra
        )(fn)

    return wrap


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output rows and columns; GROUP_M row tiles sweep the columns together, so the
    weight rows they share are reused from L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group_size = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _to_dtype(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """Cast; with RNE_BF16 (interpreter only: its own fp32 -> bf16 cast truncates) bf16 rounds to nearest-even
    by integer arithmetic, as the GPU's conversion instruction does."""
    if RNE_BF16 and dtype == tl.bfloat16:
        return round_to_bf16(v)
    return v.to(dtype)


@triton.jit
def _store_transposed(
    acc_t, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr, RNE_BF16: tl.constexpr
):
    """acc_t [BLOCK_N, BLOCK_M] (+ bias) -> out[offs_m, offs_n] in out's dtype."""
    n_mask = offs_n < N
    if HAS_BIAS:
        acc_t += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    tl.store(
        out,
        _to_dtype(acc_t, out_ptr.dtype.element_ty, RNE_BF16),
        mask=(offs_m < M)[None, :] & n_mask[:, None],
    )


# Both kernels compute the transposed product out.T = W @ x.T: the decoded weight tile is then the left
# operand of the dot, which Hopper's wgmma can read from registers (the right operand must be in shared
# memory, where the pipelined activation loads already are).


@_autotuned(["M_BUCKET", "N", "K", "QTYPE"])
@triton.jit
def _gguf_matmul_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    row_bytes,
    M_BUCKET,
    QTYPE: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    RUN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cols = tl.arange(0, 64)
    col_lo = (cols // RUN) * (2 * RUN) + cols % RUN  # K index (in the step) of each lo column
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * row_bytes  # [BN, 1] byte address of each row

    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K // 128):
        if QTYPE < 5:
            w_lo, w_hi = _legacy_halves(w_rows, step, n_mask, QTYPE, TYPE_SIZE)
        else:
            w_lo, w_hi = _k_quant_halves(w_rows, step, n_mask, QTYPE, TYPE_SIZE)
        k0 = step * 128
        x_lo = tl.load(x_rows + k0 + col_lo[None, :], mask=m_mask[:, None], other=0.0)
        x_hi = tl.load(x_rows + k0 + RUN + col_lo[None, :], mask=m_mask[:, None], other=0.0)
        # the weight is rounded to the activation dtype, like dequantize-then-matmul
        w_lo = _to_dtype(w_lo, x_lo.dtype, RNE_BF16)
        w_hi = _to_dtype(w_hi, x_hi.dtype, RNE_BF16)
        if DOT_F32:
            acc_t = tl.dot(w_lo.to(tl.float32), tl.trans(x_lo.to(tl.float32)), acc_t, input_precision="ieee")
            acc_t = tl.dot(w_hi.to(tl.float32), tl.trans(x_hi.to(tl.float32)), acc_t, input_precision="ieee")
        else:
            acc_t = tl.dot(w_lo, tl.trans(x_lo), acc_t)
            acc_t = tl.dot(w_hi, tl.trans(x_hi), acc_t)
    _store_transposed(acc_t, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, RNE_BF16)


@_autotuned(["M_BUCKET", "N", "K"])
@triton.jit
def _q8_0_int8_kernel(
    xq_ptr,
    xs_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    row_bytes,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask = offs_m < M
    n_mask = offs_n < N
    lane = tl.arange(0, 32)
    x_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * row_bytes

    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for blk in range(0, K // 32):
        x = tl.load(x_rows + blk * 32 + lane[None, :], mask=m_mask[:, None], other=0)
        w_at = w_rows + blk * 34
        w = tl.load(w_at + 2 + lane[None, :], mask=n_mask[:, None], other=0).to(tl.int8, bitcast=True)
        d = load_f16(w_at, n_mask[:, None])  # [BN, 1] block scales
        acc_t += tl.dot(w, tl.trans(x), out_dtype=tl.int32).to(tl.float32) * d
    acc_t = acc_t * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
    _store_transposed(acc_t, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, RNE_BF16)


def _check(
    x2d: torch.Tensor, raw: torch.Tensor, qtype: str, n: int, k: int, bias: torch.Tensor | None
) -> None:
    if x2d.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "DiT Quant: the fused GGUF kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1)"
        )
    if k % K_MULTIPLE[qtype]:
        raise ValueError(
            f"DiT Quant: fused {qtype} matmul needs K to be a multiple of {K_MULTIPLE[qtype]}, got {k}"
        )
    block_size, type_size = BLOCK_LAYOUT[qtype]
    if raw.dtype != torch.uint8 or raw.numel() != n * (k // block_size) * type_size:
        raise ValueError(
            f"DiT Quant: weight bytes {raw.dtype} {tuple(raw.shape)} do not hold a {qtype} [{n}, {k}] matrix"
        )
    if bias is not None and (bias.shape != (n,) or bias.device != x2d.device):
        raise ValueError(
            f"DiT Quant: bias must be [{n}] on {x2d.device}, got {tuple(bias.shape)} on {bias.device}"
        )


def _launch(
    kernel,
    inputs: tuple[torch.Tensor, ...],
    raw: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    k: int,
    config: TileConfig | None,
    **constexprs,
) -> None:
    """Launch ``kernel`` for ``out [M, N] = inputs [M, K] x raw [N, K] (+ bias)`` with ``config``, else the
    autotuned tile (DIT_QUANT_GGUF_AUTOTUNE=1), else :func:`default_config`; the interpreter always gets a
    fixed 32x32 tile."""
    m, n = out.shape
    m_bucket = min(next_power_of_2(max(m, 1)), 4096)  # autotuning key: once per size class, not per M

    def grid(meta):
        return (ceil_div(m, meta["BLOCK_M"]) * ceil_div(n, meta["BLOCK_N"]),)

    if INTERPRETED:
        config = TileConfig(32, 32, 4, 1)
    elif config is None and not AUTOTUNE:
        config = default_config(m, torch.cuda.get_device_capability(out.device))
    if config is not None:
        if isinstance(kernel, triton.runtime.Autotuner):
            kernel = kernel.fn  # the plain kernel under the autotuner
        constexprs.update(
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    args = (
        *inputs,
        raw,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        inputs[0].stride(0),
        out.stride(0),
        raw.numel() // n,
        m_bucket,
    )
    constexprs.update(HAS_BIAS=bias is not None, GROUP_M=8, RNE_BF16=INTERPRETED)
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel[grid](*args, **constexprs)
        return
    launcher = _LAUNCHERS.get(id(kernel))  # by id: hashing a JITFunction takes a lock per call
    if launcher is None:
        launcher = _LAUNCHERS[id(kernel)] = CachedLauncher(kernel)
    launcher(grid(constexprs), args, tuple(constexprs.items()))


_LAUNCHERS: dict[int, CachedLauncher] = {}  # id of a module-level kernel (they live as long as the process)


def gguf_linear_fused(
    x2d: torch.Tensor,
    raw: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x2d [M, K] (bf16/fp16/fp32, K contiguous) @ dequant(raw).T + bias -> [M, N] in x2d.dtype.

    raw: the GGUF bytes of a [N, K] weight (uint8, rows contiguous); qtype in FUSED_TYPES; K a multiple of
    K_MULTIPLE[qtype]. ``config`` forces a tile (benchmarks); by default see :func:`_launch`.
    """
    if qtype not in _QTYPE_ID:
        raise ValueError(f"DiT Quant: no fused GGUF kernel for {qtype}; have {FUSED_TYPES}")
    _check(x2d, raw, qtype, n, k, bias)
    x2d = last_dim_contiguous(x2d)
    out = torch.empty((x2d.shape[0], n), dtype=x2d.dtype, device=x2d.device)
    _launch(
        _gguf_matmul_kernel,
        (x2d,),
        raw,
        bias,
        out,
        k,
        config,
        QTYPE=_QTYPE_ID[qtype],
        TYPE_SIZE=BLOCK_LAYOUT[qtype][1],
        RUN=_RUN[qtype],
        # fp32 inputs get exact fp32 dots; the interpreter's bf16/fp16 dots are wrong in Triton 3.9
        DOT_F32=x2d.dtype == torch.float32 or INTERPRETED,
    )
    return out


def gguf_linear_int8_q8_0(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    raw: torch.Tensor,
    n: int,
    k: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """INT8 tensor-core Q8_0 linear: per-token int8 activations xq [M, K] with fp32 scales x_scale [M]
    (from ``kernels.quantize_rows``) times the Q8_0 weight bytes raw ([N, K] matrix) -> [M, N] out_dtype."""
    _check(xq, raw, "Q8_0", n, k, bias)
    if xq.dtype != torch.int8 or x_scale.shape != xq.shape[:1]:
        raise ValueError("DiT Quant: int8 Q8_0 matmul needs int8 activations [M, K] and fp32 scales [M]")
    out = torch.empty((xq.shape[0], n), dtype=out_dtype, device=xq.device)
    _launch(_q8_0_int8_kernel, (xq, x_scale), raw, bias, out, k, config)
    return out
