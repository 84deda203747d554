"""Probe: can the activation quantization run on every SM beside the GEMM's program, in the registers the
GEMM leaves free, for less than it costs as a separate pass? (GPU time, CUDA-graph replays, L2 flushed.)

Run 17 (probe_quant_beside_gemm) gave the quantization a few whole SMs, and each moved only 22-55 GB/s:
too little. Here the 128x256 GEMM keeps all SMs, its registers capped (``maxnreg``) so that a small
quantize program (one or two warps, no shared memory) fits beside it on each SM: the GEMM takes 225 KB of
the SM's 228 KB of shared memory and, uncapped, nearly all of its 65,536 registers. For each layer this
times, with no dependency between the two (an upper bound for a version whose GEMM waits on per-row-block
flags and quantizes only its first wave's rows before it starts):
- today's path: the quantize kernel on all SMs, then the GEMM;
- the GEMM alone, with the compiler's register count and with each cap;
- the persistent quantize program alone, one per SM (GB/s per program: what it must reach is the
  activation's 3 bytes per element over the GEMM's time);
- both at once on two streams.
Each row also says whether the two kernels fit on one SM together, from their compiled register counts and
shared memory, and whether the quantize program writes the reference's int8 rows and scales.

    python bench/probe_quant_coresident.py [--out DIR]

Writes probe_quant_coresident.{json,md} to bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from w8a8_common import (
    arg_parser,
    environment,
    import_kernels,
    markdown_table,
    probe_markdown,
    require_cuda,
    save_results,
    time_ms,
    writes_reference_rows,
)

# The jit helpers below are called from this file's kernel, so the pack is imported before it is defined.
import_kernels()
from dit_quant.kernels import w8a8_triton as wt  # noqa: E402
from dit_quant.kernels.w8a8_triton import _row_scale_of, _store_quantized_row  # noqa: E402

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (9216, 3072, 3072),
          (4608, 2304, 2304)]
REGISTER_CAPS = (None, 240, 232)  # None: as the compiler chooses
SIDE_WARPS = (1, 2)
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
BLOCK_RESERVED_SHARED_BYTES = 1024  # the driver's per-block reservation on sm_80+


@triton.jit
def _quantize_rows_strided_kernel(x_ptr, q_ptr, scale_ptr, M, K, num_programs, BLOCK_K: tl.constexpr):
    """Rows pid, pid + num_programs, ... of x [M, K] bf16: the pack's two-pass quantization of a row
    (``_quantize_rows_kernel`` without ONE_TILE), one row at a time."""
    for row in range(tl.program_id(0), M, num_programs):
        offset = tl.cast(row, tl.int64) * K
        scale, inverse = _row_scale_of(x_ptr + offset, x_ptr, K, False, BLOCK_K)
        _store_quantized_row(x_ptr + offset, x_ptr, q_ptr + offset, K, inverse, False, BLOCK_K)
        tl.store(scale_ptr + row, scale)


def quantize_rows_strided(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, programs: int,
                          warps: int):
    """``_quantize_rows_strided_kernel`` on ``programs`` programs of ``warps`` warps (32 row elements per
    thread and step); returns the compiled kernel (None in the interpreter)."""
    m, k = x.shape
    return _quantize_rows_strided_kernel[(programs,)](x, q, scale, m, k, programs, BLOCK_K=1024 * warps,
                                                      num_warps=warps, enable_fp_fusion=False)


def _warp_registers(compiled, warps: int) -> int:
    """Registers a kernel's program takes from the SM's file (allocated per warp in steps of 256)."""
    return warps * math.ceil(compiled.n_regs * 32 / 256) * 256


def probe_shape(m: int, k: int, n: int, slots: int, side: torch.cuda.Stream) -> dict:
    """Timings (ms) and fit of one layer shape; see the module docstring."""
    from dit_quant.kernels.w8a8_reference import quantize_rows_reference

    config = wt._HOPPER_WIDE
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).bfloat16()
    x2 = x.clone()
    weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    weight_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-3
    q, scale = wt.quantize_rows_triton(x)
    q2, scale2 = torch.empty_like(q), torch.empty_like(scale)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    gemm_args = wt._tma_gemm_args(config, q, scale, weight, weight_scale, None, out, slots)
    gemm_constants = dict(wt._tma_gemm_constants(config, False, False, False))

    def gemm(cap):
        options = {} if cap is None else {"maxnreg": cap}
        return wt._w8a8_gemm_tma_kernel[(slots,)](*gemm_args, **gemm_constants, **options)

    q_ref, scale_ref = quantize_rows_reference(x)
    row = {"m": m, "k": k, "n": n,
           "today_ms": time_ms(lambda: wt.w8a8_linear_triton(x, weight, weight_scale, None, None, config),
                               graph=True),
           "quant_full_ms": time_ms(lambda: wt.quantize_rows_triton(x), graph=True), "gemm": {}, "side": {}}
    for cap in REGISTER_CAPS:
        compiled = gemm(cap)
        row["gemm"][str(cap)] = {"ms": time_ms(lambda cap=cap: gemm(cap), graph=True),
                                 "regs": compiled.n_regs, "spills": compiled.n_spills,
                                 "shared": compiled.metadata.shared,
                                 "sm_registers": _warp_registers(compiled, config.num_warps)}
    for warps in SIDE_WARPS:
        def side_quantize(warps=warps):
            return quantize_rows_strided(x2, q2, scale2, slots, warps)

        compiled = side_quantize()
        exact = writes_reference_rows(side_quantize, q2, scale2, q_ref, scale_ref)
        alone = time_ms(side_quantize, graph=True)
        entry = {"exact": exact, "ms": alone, "gb_s_per_program": m * k * 3 / alone / 1e6 / slots,
                 "regs": compiled.n_regs, "shared": compiled.metadata.shared, "together": {}}
        for cap in REGISTER_CAPS:
            gemm_fit = row["gemm"][str(cap)]

            def both(cap=cap, side_quantize=side_quantize):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    side_quantize()
                gemm(cap)
                torch.cuda.current_stream().wait_stream(side)

            fits = (gemm_fit["sm_registers"] + _warp_registers(compiled, warps) <= SM_REGISTERS
                    and gemm_fit["shared"] + compiled.metadata.shared + 2 * BLOCK_RESERVED_SHARED_BYTES
                    <= SM_SHARED_BYTES)
            entry["together"][str(cap)] = {"ms": time_ms(both, graph=True), "fits": fits}
        row["side"][warps] = entry
    return row


def table_rows(row: dict) -> list[list]:
    """One table line per (side warps, register cap) of a probed layer."""
    lines = []
    for warps, side in row["side"].items():
        for cap, together in side["together"].items():
            gemm = row["gemm"][cap]
            lines.append([f"{row['m']}x{row['k']}->{row['n']}", warps, cap, f"{row['today_ms'] * 1e3:.1f}",
                          f"{row['quant_full_ms'] * 1e3:.1f}", f"{gemm['ms'] * 1e3:.1f}",
                          f"{gemm['regs']}/{gemm['spills']}", f"{side['ms'] * 1e3:.1f}",
                          f"{side['gb_s_per_program']:.1f}", f"{together['ms'] * 1e3:.1f}",
                          "yes" if together["fits"] else "no", f"{row['today_ms'] / together['ms']:.3f}",
                          "yes" if side["exact"] else "NO"])
    return lines


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    require_cuda("probe_quant_coresident")
    slots = wt.program_slots(torch.device("cuda"))
    side = torch.cuda.Stream()
    env = environment()
    results, table = [], []
    headers = ["layer", "side warps", "GEMM maxnreg", "today µs", "quant µs", "GEMM µs", "GEMM regs/spills",
               "side quant µs", "GB/s per program", "both at once µs", "fit one SM", "today / both", "= ref"]
    for m, k, n in SHAPES:
        row = probe_shape(m, k, n, slots, side)
        results.append(row)
        for line in table_rows(row):
            table.append(line)
            print(line, flush=True)
        markdown = probe_markdown("Quantization beside the GEMM on every SM", env, __doc__,
                                  markdown_table(headers, table))
        # after every layer: a run cut short keeps what it measured
        save_results("probe_quant_coresident", {"environment": env, "results": results}, markdown, args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
