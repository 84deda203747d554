"""Triton kernels of the INT8 W8A8 linear (see w8a8_reference.py for the exact math they reproduce).

Two paths, chosen by the number of rows M:
- large M: ``_quantize_rows_kernel`` (one pass: per-row amax, then int8 rows + fp32 scales) followed by
  ``_w8a8_gemm_kernel`` in its int8-A mode (int8 tensor-core GEMM, int32 accumulation, fused epilogue:
  row scale x column scale (+ bias) -> output dtype);
- small M: ``_w8a8_gemm_kernel`` alone in its quantize-on-load mode: each program computes the row
  amax of its few rows over the whole K, then quantizes the activation tiles in registers as it loads
  them. One launch, no int8 activation round trip through memory.

The weight is int8 [N, K] with K contiguous (nn.Linear layout): 8-bit tensor-core operands must be
K-major on Hopper (wgmma) and this layout keeps both operand loads contiguous along K.
Rounding is round-half-even through the 1.5 * 2**23 trick (exact for |v| < 2**22, here |v| <= 127),
divisions use IEEE ``div_rn`` so quantized values match torch bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# 1.5 * 2**23: adding then subtracting it rounds an fp32 to the nearest even integer.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_tile(xs, scale):
    """fp32 tile / per-row scale -> int8, round-half-even, clamped to +-127."""
    v = tl.math.div_rn(xs, scale)
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return v.to(tl.int8)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: amax over the row, then the int8 row and its fp32 scale."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        xs = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            xs = tl.math.div_rn(xs, tl.load(smooth_ptr + k0 + offs, mask=mask, other=1.0))
        amax = tl.maximum(amax, tl.abs(xs))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 127.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        xs = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            xs = tl.math.div_rn(xs, tl.load(smooth_ptr + k0 + offs, mask=mask, other=1.0))
        tl.store(q_ptr + row * stride_qm + k0 + offs, _quantize_tile(xs, scale), mask=mask)


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
def _w8a8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, smooth_ptr, out_ptr,
    M, N, K, stride_am, stride_bn, stride_om,
    QUANTIZE_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = (q(A) @ B.T) * a_scale[:, None] * b_scale[None, :] (+ bias), B int8 [N, K].

    QUANTIZE_A=False: A is int8 [M, K] and a_scale its fp32 row scales.
    QUANTIZE_A=True: A is the float activation; this program computes its rows' scales over the whole
    K (smoothing included) and quantizes each A tile on load (a_scale_ptr is unused).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the N blocks together so weight tiles are reused in L2.
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read a valid row instead (wrapped); their results are masked at the store.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
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
        a_scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
    else:
        a_scale = tl.load(a_scale_ptr + rows_a)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_step in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k_step * BLOCK_K
        if QUANTIZE_A:
            a = _load_a_tile(a_ptrs, smooth_ptrs, k_mask, EVEN_K, HAS_SMOOTH)
            a = _quantize_tile(a, a_scale[:, None])
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

    b_scale = tl.load(b_scale_ptr + rows_b)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows_b).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@dataclass(frozen=True)
class GemmConfig:
    """Launch configuration of ``_w8a8_gemm_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    quantize_a: bool  # True: the one-launch quantize-on-load path (small M)

    def operand_smem_bytes(self) -> int:
        """Shared memory of the pipelined operand tiles (the compiler may add epilogue scratch)."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k


# Shared memory per block that Triton may use (opt-in maximum), by compute capability.
SMEM_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SMALL_M_MAX = 64  # rows up to which the one-launch quantize-on-load path runs

# Interpreter (CPU tests): big tiles, one stage; its cost grows with the number of tiles, not FLOPs.
INTERPRETER_CONFIGS = {
    False: GemmConfig(64, 64, 64, 8, 4, 1, quantize_a=False),
    True: GemmConfig(16, 64, 64, 8, 4, 1, quantize_a=True),
}


def arch_key(capability: tuple[int, int]) -> int:
    """Compute capability (major, minor) -> the integer key of the config tables, e.g. (8, 6) -> 86."""
    return capability[0] * 10 + capability[1]


def candidate_configs(cc: int, small_m: bool) -> list[GemmConfig]:
    """Configs worth trying on an architecture (compute capability as an int, e.g. 86).

    The first entry is the default used without autotuning. All fit the architecture's shared memory.
    """
    if small_m:
        configs = [
            GemmConfig(16, 64, 128, 1, 4, 4, quantize_a=True),
            GemmConfig(16, 32, 128, 1, 4, 4, quantize_a=True),
            GemmConfig(16, 64, 256, 1, 4, 3, quantize_a=True),
            GemmConfig(32, 64, 128, 1, 4, 4, quantize_a=True),
            GemmConfig(64, 64, 128, 1, 4, 4, quantize_a=True),
        ]
    elif cc >= 90:
        configs = [
            GemmConfig(128, 256, 128, 8, 8, 3, quantize_a=False),
            GemmConfig(128, 128, 128, 8, 4, 4, quantize_a=False),
            GemmConfig(128, 256, 64, 8, 8, 4, quantize_a=False),
            GemmConfig(256, 128, 128, 8, 8, 3, quantize_a=False),
            GemmConfig(64, 128, 128, 8, 4, 4, quantize_a=False),
        ]
    else:
        configs = [
            GemmConfig(128, 256, 64, 8, 8, 3, quantize_a=False),
            GemmConfig(128, 128, 64, 8, 4, 4, quantize_a=False),
            GemmConfig(128, 128, 128, 8, 8, 3, quantize_a=False),
            GemmConfig(64, 128, 64, 8, 4, 4, quantize_a=False),
            GemmConfig(256, 128, 64, 8, 8, 3, quantize_a=False),
        ]
    limit = SMEM_LIMIT_BYTES.get(cc, 99 * 1024)
    # Leave room for the epilogue's layout-conversion scratch the compiler adds on top of the operands.
    return [c for c in configs if c.operand_smem_bytes() <= limit - 16 * 1024]


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
    m, k = x2d.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, scale
    block_k = min(triton.next_power_of_2(k), 4096 if INTERPRETED else 1024)
    _quantize_rows_kernel[(m,)](
        x2d, smooth if smooth is not None else scale, q, scale,
        k, x2d.stride(0), q.stride(0),
        HAS_SMOOTH=smooth is not None, BLOCK_K=block_k, num_warps=4,
    )
    return q, scale


def launch_gemm(
    config: GemmConfig,
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Launch ``_w8a8_gemm_kernel`` with one config, writing into out [M, N].

    a: int8 [M, K] with a_scale fp32 [M] (config.quantize_a False), or the float activation [M, K]
    with a_scale None (config.quantize_a True). All tensors have their last dim contiguous.
    """
    m, k = a.shape
    n = weight.shape[0]
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _w8a8_gemm_kernel[grid](
        a, weight, a_scale if a_scale is not None else weight_scale, weight_scale,
        bias if bias is not None else weight_scale, smooth if smooth is not None else weight_scale, out,
        m, n, k, a.stride(0), weight.stride(0), out.stride(0),
        QUANTIZE_A=config.quantize_a, HAS_BIAS=bias is not None, HAS_SMOOTH=smooth is not None,
        EVEN_K=k % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


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
    smooth fp32 [K] or None. Returns [M, N] in x2d.dtype.
    """
    _check_launchable(x2d)
    m = x2d.shape[0]
    out = torch.empty((m, weight.shape[0]), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return out
    if config.quantize_a:
        launch_gemm(config, x2d, None, weight, weight_scale, bias, smooth, out)
    else:
        q, scale = quantize_rows_triton(x2d, smooth)
        launch_gemm(config, q, scale, weight, weight_scale, bias, None, out)
    return out
