"""Probe: can activation quantization run on a few SMs beside the GEMM on the others, for less than it
costs as a separate full-GPU pass? (GPU time, CUDA-graph replays, L2 flushed.)

For each layer shape it times, without any dependency between the two (an upper bound on what a
flag-synchronized version could reach):
- today's path: the quantize kernel over all SMs, then the persistent TMA GEMM on all SMs;
- the GEMM alone on all SMs, and on ``slots - S`` SMs;
- a persistent quantize kernel on S programs alone (GB/s per program; with one or two row groups in
  flight per program);
- both at once on two streams: the quantize kernel on S programs and the GEMM on ``slots - S``.

    python bench/probe_quant_beside_gemm.py [--out DIR]

Writes probe_quant_beside_gemm.{json,md} to bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from w8a8_common import (
    arg_parser,
    environment,
    import_kernels,
    markdown_table,
    probe_markdown,
    quantize_beside_inputs,
    require_cuda,
    save_results,
    time_ms,
    writes_reference_rows,
)

# The jit helpers below are called from this file's kernel, so the pack is imported before it is defined.
import_kernels()
from dit_quant.kernels.w8a8_triton import _round_to_int8, _row_scale  # noqa: E402

SHAPES = [(4608, 3072, 3072), (4608, 15360, 3072), (9216, 3072, 3072), (4096, 12288, 3072),
          (4608, 3072, 12288)]
SIDE_PROGRAMS = (8, 16, 24, 32)


@triton.jit
def _row_group(first, M, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows first .. first + ROWS - 1 (int64) and the in-range mask of their [ROWS, BLOCK_K] tile."""
    rows = (first + tl.arange(0, ROWS)).to(tl.int64)
    return rows, (rows < M)[:, None] & (tl.arange(0, BLOCK_K) < K)[None, :]


@triton.jit
def _load_rows(x_ptr, first, M, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, mask = _row_group(first, M, K, ROWS, BLOCK_K)
    return tl.load(x_ptr + rows[:, None] * K + tl.arange(0, BLOCK_K)[None, :], mask=mask, other=0.0)


@triton.jit
def _quantize_rows_persistent_kernel(x_ptr, q_ptr, scale_ptr, M, K, num_programs,
                                     ROWS: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """ROWS rows per step, programs striding over row groups; the math of _quantize_rows_kernel.
    PREFETCH: load the next row group before quantizing the current one (two groups in flight)."""
    step = num_programs * ROWS
    if PREFETCH:
        x_next = _load_rows(x_ptr, tl.program_id(0) * ROWS, M, K, ROWS, BLOCK_K)
    for first in range(tl.program_id(0) * ROWS, M, step):
        if PREFETCH:
            xs = x_next.to(tl.float32)
            x_next = _load_rows(x_ptr, first + step, M, K, ROWS, BLOCK_K)
        else:
            xs = _load_rows(x_ptr, first, M, K, ROWS, BLOCK_K).to(tl.float32)
        rows, mask = _row_group(first, M, K, ROWS, BLOCK_K)
        scale, inverse = _row_scale(tl.max(tl.abs(xs), axis=1))
        tl.store(q_ptr + rows[:, None] * K + tl.arange(0, BLOCK_K)[None, :],
                 _round_to_int8(xs * inverse[:, None]), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rows < M)


def quantize_rows_persistent(x, q, scale, programs: int, prefetch: bool = True) -> None:
    """``_quantize_rows_persistent_kernel`` on ``programs`` programs of 1024 threads, 32768 row elements
    (padded to a power of two per row) per step."""
    m, k = x.shape
    block_k = triton.next_power_of_2(k)
    _quantize_rows_persistent_kernel[(programs,)](x, q, scale, m, k, programs, ROWS=max(1, 32768 // block_k),
                                                  BLOCK_K=block_k, PREFETCH=prefetch, num_warps=32,
                                                  enable_fp_fusion=False)


def probe_shape(m: int, k: int, n: int, slots: int, side: torch.cuda.Stream) -> dict:
    """Timings (ms) of one layer shape; see the module docstring."""
    from dit_quant.kernels import w8a8_triton as wt
    from dit_quant.kernels.w8a8_reference import quantize_rows_reference

    config = wt._HOPPER_WIDE
    x, x2, weight, weight_scale, q, scale, q2, scale2, out = quantize_beside_inputs(m, k, n)

    def gemm(programs):
        args = wt._tma_gemm_args(config, q, scale, weight, weight_scale, None, out, programs)
        constants = wt._tma_gemm_constants(config, False, False, False)
        wt._tma_gemm_launcher.prepare((programs,), args, constants)()

    def side_quantize(programs, prefetch=True):
        quantize_rows_persistent(x2, q2, scale2, programs, prefetch)

    q_ref, scale_ref = quantize_rows_reference(x)
    exact = all(writes_reference_rows(lambda p=prefetch: side_quantize(8, p), q2, scale2, q_ref, scale_ref)
                for prefetch in (False, True))
    row = {"m": m, "k": k, "n": n, "exact": exact,
           "today_ms": time_ms(lambda: wt.w8a8_linear_triton(x, weight, weight_scale, None, None, config),
                               graph=True),
           "quant_full_ms": time_ms(lambda: wt.quantize_rows_triton(x), graph=True),
           "gemm_full_ms": time_ms(lambda: gemm(slots), graph=True), "side": {}}
    for s in SIDE_PROGRAMS:
        def both(s=s):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                side_quantize(s)
            gemm(slots - s)
            torch.cuda.current_stream().wait_stream(side)

        quant_side = time_ms(lambda s=s: side_quantize(s), graph=True)
        quant_plain = time_ms(lambda s=s: side_quantize(s, False), graph=True)
        row["side"][s] = {"quant_ms": quant_side, "gb_s_per_program": m * k * 3 / quant_side / 1e6 / s,
                          "gb_s_per_program_without_prefetch": m * k * 3 / quant_plain / 1e6 / s,
                          "gemm_rest_ms": time_ms(lambda s=s: gemm(slots - s), graph=True),
                          "together_ms": time_ms(both, graph=True)}
    return row


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    require_cuda("probe_quant_beside_gemm")
    from dit_quant.kernels import w8a8_triton as wt

    slots = wt.program_slots(torch.device("cuda"))
    side = torch.cuda.Stream()
    results, table = [], []
    for m, k, n in SHAPES:
        row = probe_shape(m, k, n, slots, side)
        results.append(row)
        for s, t in row["side"].items():
            table.append([f"{m}x{k}->{n}", s] + [f"{v * 1e3:.1f}" for v in (
                row["today_ms"], row["quant_full_ms"], row["gemm_full_ms"], t["gemm_rest_ms"], t["quant_ms"])]
                + [f"{t['gb_s_per_program_without_prefetch']:.0f}", f"{t['gb_s_per_program']:.0f}",
                   f"{t['together_ms'] * 1e3:.1f}",
                   f"{row['today_ms'] / t['together_ms']:.3f}", "yes" if row["exact"] else "NO"])
            print(table[-1], flush=True)
    headers = ["layer", "S", "today µs", "quant µs", "GEMM µs", f"GEMM on {slots}-S µs", "quant on S µs",
               "GB/s per program, one group in flight", "two groups in flight", "both at once µs",
               "today / both", "= ref"]
    env = environment()
    markdown = probe_markdown("Quantization beside the GEMM", env, __doc__, markdown_table(headers, table))
    save_results("probe_quant_beside_gemm", {"environment": env, "results": results}, markdown, args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
