"""Probe: does activation quantization move more bytes per SM when its rows arrive through the tensor
memory accelerator (TMA bulk copies into shared memory, pipelined by Triton) than through the load/store
units? (GPU time, CUDA-graph replays, L2 flushed.)

Run 17 measured 22-32 GB/s per program for a persistent load/store quantize kernel on S = 8-32 SMs,
the same per-SM share as a full-GPU pass: too little to hide the pass on a few SMs beside the GEMM. A
per-SM limit on outstanding loads would explain it, and bulk copies are not bound by it. For each
activation shape this times, all bit-identical to the torch reference:
- the pack's quantize kernel (one program per row) and a torch bf16 -> int8 cast (same bytes moved);
- the run-17 load/store persistent kernel on S programs (GB/s per program);
- a TMA persistent kernel (rows viewed as [chunks, 64] so that one copy brings whole rows; stores
  through TMA too) on S programs and on the whole GPU, over rows per step, pipeline stages and warps.

    python bench/probe_quant_tma.py [--out DIR]

Writes probe_quant_tma.{json,md} to bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
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
from dit_quant.kernels.w8a8_triton import _round_to_int8, _row_scale  # noqa: E402
from probe_quant_beside_gemm import quantize_rows_persistent  # noqa: E402

SHAPES = [(4608, 3072), (9216, 3072), (4608, 15360)]
SIDE_PROGRAMS = (8, 16, 32)
CHUNK = 64  # bf16 elements per innermost box row: 128 bytes, one TMA swizzle width
# (rows per step, pipeline stages, warps); rows per step shrink for long rows (see _rows_per_step).
TMA_VARIANTS = [(rows, stages, warps) for rows in (1, 2, 4, 8) for stages in (2, 3, 4) for warps in (8, 16)]


@triton.jit
def _quantize_rows_tma_kernel(x_desc, q_desc, scale_ptr, M, num_programs,
                              ROWS: tl.constexpr, STAGES: tl.constexpr):
    """ROWS whole rows per step through 3-D descriptors [M, K / CHUNK, CHUNK] whose box covers a whole row
    (chunks past K are zero-filled on load and clipped on store); programs stride over row groups."""
    step = num_programs * ROWS
    for first in tl.range(tl.program_id(0) * ROWS, M, step, num_stages=STAGES):
        xs = x_desc.load([first, 0, 0]).to(tl.float32)
        scale, inverse = _row_scale(tl.max(tl.max(tl.abs(xs), axis=2), axis=1))
        q_desc.store([first, 0, 0], _round_to_int8(xs * inverse[:, None, None]))
        rows = first + tl.arange(0, ROWS)
        tl.store(scale_ptr + rows, scale, mask=rows < M)


def _rows_per_step(rows: int, k: int) -> int:
    """Rows per step, capped so that one step's padded box holds at most 32768 elements (64 KB)."""
    return max(1, min(rows, 32768 // (triton.next_power_of_2(k // CHUNK) * CHUNK)))


def tma_quantize(x, q, scale, programs: int, rows: int, stages: int, warps: int) -> None:
    m, k = x.shape
    box = [rows, triton.next_power_of_2(k // CHUNK), CHUNK]
    _quantize_rows_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(x.view(m, k // CHUNK, CHUNK), box),
        TensorDescriptor.from_tensor(q.view(m, k // CHUNK, CHUNK), box),
        scale, m, programs, ROWS=rows, STAGES=stages, num_warps=warps, enable_fp_fusion=False)


def probe_shape(m: int, k: int, slots: int) -> dict:
    """Timings (ms) and bit-identity of one activation shape; see the module docstring."""
    from dit_quant.kernels import w8a8_triton as wt
    from dit_quant.kernels.w8a8_reference import quantize_rows_reference

    g = torch.Generator(device="cuda").manual_seed(k)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).bfloat16()
    q_ref, scale_ref = quantize_rows_reference(x)
    q, scale = torch.empty_like(q_ref), torch.empty_like(scale_ref)

    def exact(run) -> bool:
        return writes_reference_rows(run, q, scale, q_ref, scale_ref)

    def lsu_side(programs):
        quantize_rows_persistent(x, q, scale, programs)

    row = {"m": m, "k": k, "gb": m * k * 3 / 1e9,
           "pack_ms": time_ms(lambda: wt.quantize_rows_triton(x), graph=True),
           "cast_ms": time_ms(lambda: x.to(torch.int8), graph=True),
           "lsu_side": {s: time_ms(lambda s=s: lsu_side(s), graph=True) for s in SIDE_PROGRAMS},
           "lsu_exact": exact(lambda: lsu_side(8)), "tma": []}
    for rows, stages, warps in dict.fromkeys((_rows_per_step(r, k), s, w) for r, s, w in TMA_VARIANTS):
        variant = {"rows": rows, "stages": stages, "warps": warps}

        def run(programs, rows=rows, stages=stages, warps=warps):
            tma_quantize(x, q, scale, programs, rows, stages, warps)

        try:
            variant["exact"] = exact(lambda: run(slots))
            for programs in (*SIDE_PROGRAMS, slots, 2 * slots):
                variant[programs] = time_ms(lambda p=programs: run(p), graph=True)
        except Exception as error:  # noqa: BLE001 - a variant that does not compile or launch is reported
            variant["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(m, k, variant, flush=True)
        row["tma"].append(variant)
    return row


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    require_cuda("probe_quant_tma")
    from dit_quant.kernels import w8a8_triton as wt

    slots = wt.program_slots(torch.device("cuda"))
    results, table = [], []
    for m, k in SHAPES:
        row = probe_shape(m, k, slots)
        results.append(row)
        timed = [v for v in row["tma"] if "error" not in v and v["exact"]]
        best_full = min(timed, key=lambda v: min(v[slots], v[2 * slots]), default=None)
        cells = [f"{m}x{k}", f"{row['pack_ms'] * 1e3:.1f}", f"{row['gb'] / row['pack_ms']:.2f}",
                 f"{row['cast_ms'] * 1e3:.1f}"]
        if best_full is not None:
            full = min(best_full[slots], best_full[2 * slots])
            cells += [f"{full * 1e3:.1f}", f"{row['gb'] / full:.2f}",
                      f"{best_full['rows']}/{best_full['stages']}/{best_full['warps']}"]
        else:
            cells += ["-", "-", "-"]
        for s in SIDE_PROGRAMS:
            best = min((v[s] for v in timed), default=None)
            cells.append(f"{row['gb'] / row['lsu_side'][s] / s * 1e3:.0f} / "
                         + ("-" if best is None else f"{row['gb'] / best / s * 1e3:.0f}"))
        cells.append("yes" if row["lsu_exact"] and all(v.get("exact") for v in row["tma"]) else "NO")
        table.append(cells)
        print(cells, flush=True)
    headers = (["activation", "pack kernel µs", "TB/s", "torch cast µs", "TMA, whole GPU µs", "TB/s",
                "rows/stages/warps"] + [f"GB/s per program, S = {s}: load/store / TMA" for s in SIDE_PROGRAMS]
               + ["all = ref"])
    env = environment()
    markdown = probe_markdown("Quantization through TMA", env, __doc__, markdown_table(headers, table),
                              "Bytes counted: the bf16 read and the int8 write. Variants that failed are "
                              "listed in the JSON.")
    save_results("probe_quant_tma", {"environment": env, "results": results}, markdown, args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
