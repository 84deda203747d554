"""Probe: can the activation quantization run on every SM beside the GEMM's program, in the registers the
GEMM leaves free, for less than it costs as a separate pass? (GPU time, CUDA-graph replays, L2 flushed.)

Run 17 (probe_quant_beside_gemm) gave the quantization a few whole SMs, and each moved only 22-55 GB/s:
too little. Here the 128x256 GEMM keeps all SMs, its registers capped (``maxnreg``) so that a small
quantize program (one to four warps, a few bytes of shared memory) fits beside it on each SM: the GEMM
takes 225 KB of the SM's 228 KB of shared memory and, uncapped, nearly all of its 65,536 registers. For
each layer this times, with no dependency between the two (an upper bound for a version whose GEMM waits
on per-row-block flags and quantizes only its first wave's rows before it starts), and then that version
itself:
- today's path: the quantize kernel on all SMs, then the GEMM;
- the GEMM alone, with the compiler's register count and with each cap;
- the persistent quantize program alone, one per SM (GB/s per program: what it must reach is the
  activation's 3 bytes per element over the GEMM's time);
- both at once on two streams, no dependency (the upper bound);
- "overlapped": the pack's quantize kernel on the rows of the GEMM's first wave, the strided program on
  the rest on a second stream, counting finished rows per 128-row block, and a GEMM that waits
  for each row block's count before its tiles load it (the tile loop is not flattened, so that no load of
  a tile is issued before its wait). A program that waits past MAX_SPINS reads quantizes the block
  itself (counted as a fallback), so the version cannot hang where the quantize program finds no room.
  GROUP_M 8 (the pack's tile order) and 1 (row-major: a smaller first
  wave), at each register cap, launched with programmatic dependent launch as the pack's GEMM. Its
  control is the same GEMM with no waits, on rows quantized beforehand.
Each row also says whether the two kernels fit on one SM together, from their compiled register counts and
shared memory (the overlapped version runs only where they fit), how many row blocks the GEMM had to
quantize itself, and whether the outputs are the reference's (the quantize program's int8 rows and
scales; the overlapped linear's output bit-identical to today's).

    python bench/probe_quant_coresident.py [--out DIR]
    python bench/probe_quant_coresident.py --median [--budget-s S]   # the overlapped linear at all 60
                                                   # M >= 1024 pairs of the per-layer benchmark
    python bench/probe_quant_coresident.py --aot   # no GPU: compile for sm_90, print registers, spills,
                                                   # shared memory and which pairs fit one SM

Writes probe_quant_coresident.{json,md} (--median: probe_quant_coresident_median.{json,md}) to
bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import statistics
import time

import torch
import triton
import triton.language as tl
from w8a8_common import (
    aot_compile_helpers,
    environment,
    import_kernels,
    layer_inputs,
    markdown_table,
    probe_arguments,
    probe_markdown,
    quantize_beside_inputs,
    save_results,
    time_ms,
    writes_reference_rows,
)

# The jit helpers below are called from this file's kernel, so the pack is imported before it is defined.
import_kernels()
from dit_quant.kernels import w8a8_triton as wt  # noqa: E402
from dit_quant.kernels.w8a8_triton import (  # noqa: E402
    _round_to_int8,
    _row_scale,
    _row_scale_of,
    _store_quantized_row,
    _tile_coords,
    _tma_gemm_tile,
    gdc_wait,
)

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (9216, 3072, 3072),
          (4608, 2304, 2304)]
REGISTER_CAPS = (None, 240, 232)  # None: as the compiler chooses
SIDE_WARPS = (1, 2, 4)
OVERLAP_GROUP_M = (8, 1)
# reads of a row block's count (~10 ms) before a GEMM program quantizes the block itself
MAX_SPINS = 20_000
QUANT_BLOCK_K = 1024  # row elements per step of the GEMM's own fallback quantization
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
BLOCK_RESERVED_SHARED_BYTES = 1024  # the driver's per-block reservation on sm_80+


@triton.jit
def _signal_row(ready_ptr, row, SIGNAL_BLOCK_M: tl.constexpr):
    if SIGNAL_BLOCK_M > 0:
        tl.debug_barrier()  # every thread's stores of the row come before the release
        tl.atomic_add(ready_ptr + row // SIGNAL_BLOCK_M, 1, sem="release", scope="gpu")


@triton.jit
def _quantize_rows_strided_kernel(x_ptr, q_ptr, scale_ptr, ready_ptr, first_row, M, K, num_programs,
                                  BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
                                  SIGNAL_BLOCK_M: tl.constexpr):
    """Rows first_row + pid, + num_programs, ... of x [M, K] bf16, one at a time, as the pack's
    ``_quantize_rows_kernel`` quantizes a row. ONE_TILE (K <= BLOCK_K): the row in registers, and the next
    row's load issued before this one is quantized (two rows in flight); otherwise two passes over each
    row. SIGNAL_BLOCK_M > 0: after each row, add 1 (release, GPU scope) to
    ready_ptr[row // SIGNAL_BLOCK_M]."""
    first = first_row + tl.program_id(0)
    if ONE_TILE:
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x_next = tl.load(x_ptr + tl.cast(first, tl.int64) * K + offs, mask=mask & (offs * 0 + first < M),
                         other=0.0)
        for row in range(first, M, num_programs):
            xs = x_next.to(tl.float32)
            following = row + num_programs
            x_next = tl.load(x_ptr + tl.cast(following, tl.int64) * K + offs,
                             mask=mask & (offs * 0 + following < M), other=0.0)
            scale, inverse = _row_scale(tl.max(tl.abs(xs), axis=0))
            tl.store(q_ptr + tl.cast(row, tl.int64) * K + offs, _round_to_int8(xs * inverse), mask=mask)
            tl.store(scale_ptr + row, scale)
            _signal_row(ready_ptr, row, SIGNAL_BLOCK_M)
    else:
        for row in range(first, M, num_programs):
            offset = tl.cast(row, tl.int64) * K
            scale, inverse = _row_scale_of(x_ptr + offset, x_ptr, K, False, BLOCK_K)
            _store_quantized_row(x_ptr + offset, x_ptr, q_ptr + offset, K, inverse, False, BLOCK_K)
            tl.store(scale_ptr + row, scale)
            _signal_row(ready_ptr, row, SIGNAL_BLOCK_M)


def quantize_rows_strided(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, programs: int, warps: int,
                          first_row: int = 0, ready: torch.Tensor | None = None, block_m: int = 0):
    """``_quantize_rows_strided_kernel`` on ``programs`` programs of ``warps`` warps (32 row elements per
    thread and step, so rows up to 1024 * warps long are held in registers) over rows ``first_row`` on;
    with ``ready``, counting finished rows per ``block_m`` rows there. Returns the compiled kernel (None
    in the interpreter)."""
    m, k = x.shape
    block_k = 1024 * warps
    return _quantize_rows_strided_kernel[(programs,)](
        x, q, scale, ready if ready is not None else scale, first_row, m, k, programs, BLOCK_K=block_k,
        ONE_TILE=k <= block_k, SIGNAL_BLOCK_M=block_m if ready is not None else 0, num_warps=warps,
        enable_fp_fusion=False)


@triton.jit
def _rows_counted(count_ptr, target, max_spins):
    """Whether count_ptr reaches target (read with acquire, GPU scope) within max_spins reads."""
    count = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (count < target) & (spins < max_spins):
        count = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    return count >= target


@triton.jit
def _ensure_rows(x_ptr, q_ptr, scale_ptr, count_ptr, fallbacks_ptr, first_row, rows, K, max_spins,
                 FENCE: tl.constexpr, QUANT_BLOCK_K: tl.constexpr):
    """Make rows first_row .. first_row + rows - 1 of q (int8 [M, K]) and their scales ready for this
    program's TMA loads: wait until count_ptr counts them, or, past max_spins reads (the strided program
    was not scheduled beside this one), quantize them here and add 1 to fallbacks_ptr. Both write the
    same values, so a race between the two is harmless. With FENCE, each thread then orders its
    generic-proxy accesses before the async-proxy (TMA) loads, and the barrier brings every thread's there
    before the loads are issued."""
    if not _rows_counted(count_ptr, rows, max_spins):
        tl.atomic_add(fallbacks_ptr, 1)
        for r in range(rows):
            offset = tl.cast(first_row + r, tl.int64) * K
            scale, inverse = _row_scale_of(x_ptr + offset, x_ptr, K, False, QUANT_BLOCK_K)
            _store_quantized_row(x_ptr + offset, x_ptr, q_ptr + offset, K, inverse, False, QUANT_BLOCK_K)
            tl.store(scale_ptr + first_row + r, scale)
    if FENCE:
        tl.inline_asm_elementwise("fence.proxy.async.global;\n\tmov.u32 $0, $1;", "=r,r", [rows],
                                  dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def _gemm_waiting_for_rows_kernel(
    a_desc, b_desc, out_desc, x_ptr, q_ptr, a_scale_ptr, b_scale_ptr, ready_ptr, fallbacks_ptr,
    M, N, K, num_programs, first_waited_block, max_spins,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr, FENCE: tl.constexpr, WAIT_FOR_PRODUCER: tl.constexpr,
    QUANT_BLOCK_K: tl.constexpr,
):
    """The pack's persistent TMA GEMM (no bias) of q = quantized x, whose tiles in row blocks from
    first_waited_block on first make their block's rows ready (``_ensure_rows``: wait for
    ready_ptr[row block] to count them, else quantize them). WAIT_FOR_PRODUCER: launched with programmatic
    dependent launch after the quantize kernel of the first wave's rows, as the pack's GEMM."""
    if WAIT_FOR_PRODUCER:
        gdc_wait()
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(0), num_tiles, num_programs):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if pid_m >= first_waited_block:
            _ensure_rows(x_ptr, q_ptr, a_scale_ptr, ready_ptr + pid_m, fallbacks_ptr, pid_m * BLOCK_M,
                         tl.minimum(BLOCK_M, M - pid_m * BLOCK_M), K, max_spins, FENCE, QUANT_BLOCK_K)
        _tma_gemm_tile(a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, b_scale_ptr, b_scale_ptr, pid_m,
                       pid_n, M, N, K, 0, 1, 0, False, False, False, BLOCK_M, BLOCK_N, BLOCK_K,
                       SPLIT_EPILOGUE)


def first_wave_rows(m: int, n: int, config, group_m: int, programs: int) -> int:
    """Rows of the row blocks that the first ``programs`` tiles (in ``_tile_coords`` order) read."""
    blocks_m, blocks_n = -(-m // config.block_m), -(-n // config.block_n)
    last = 0
    for tile in range(min(programs, blocks_m * blocks_n)):
        first = tile // (group_m * blocks_n) * group_m
        last = max(last, first + (tile % (group_m * blocks_n)) % min(blocks_m - first, group_m))
    return min(m, (last + 1) * config.block_m)


class OverlappedLinear:
    """The overlapped linear of the module docstring for one layer's tensors: ``run()`` writes ``out``."""

    def __init__(self, x, weight, weight_scale, out, config, group_m: int, programs: int, side_warps: int,
                 cap: int | None, side: torch.cuda.Stream | None, wait: bool = True,
                 quantize_beside: bool = True, max_spins: int = MAX_SPINS):
        """``wait=False``: the control (every row quantized first). ``quantize_beside=False`` leaves the
        rows past the first wave to the GEMM's own fallback (a test of it)."""
        m, k = x.shape
        n = weight.shape[0]
        self.x, self.out, self.side, self.programs, self.side_warps = x, out, side, programs, side_warps
        self.quantize_beside = quantize_beside
        self.fallbacks = torch.zeros(1, dtype=torch.int32, device=x.device)  # row blocks the GEMM quantized
        self.q = torch.empty(m, k, dtype=torch.int8, device=x.device)
        self.scale = torch.empty(m, dtype=torch.float32, device=x.device)
        self.block_m = config.block_m
        self.ready = torch.zeros(-(-m // config.block_m), dtype=torch.int32, device=x.device)
        self.head_rows = first_wave_rows(m, n, config, group_m, programs) if wait else m
        # the pack GEMM's A, weight and output descriptors
        descriptors = wt._tma_gemm_args(config, self.q, self.scale, weight, weight_scale, None, out,
                                        programs)[:3]
        self.gemm_args = (*descriptors, x, self.q, self.scale, weight_scale, self.ready, self.fallbacks, m, n,
                          k, programs, -(-self.head_rows // config.block_m), max_spins)
        self.gemm_constants = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                   GROUP_M=group_m, SPLIT_EPILOGUE=config.split_epilogue,
                                   FENCE=not wt.INTERPRETED, **dict(wt._dependent_launch_constants(
                                       wt.uses_pdl(x.device))), QUANT_BLOCK_K=QUANT_BLOCK_K,
                                   # the fallback's quantized values as the quantize kernels' (no bias, so
                                   # the epilogue has nothing to contract either)
                                   enable_fp_fusion=False, num_warps=config.num_warps,
                                   num_stages=config.num_stages, **({} if cap is None else {"maxnreg": cap}))

    def run(self):
        """One call; returns the GEMM's compiled kernel (None in the interpreter)."""
        rest = self.head_rows < self.x.shape[0]
        if rest and self.quantize_beside:
            self.ready.zero_()
            if self.side is not None:
                self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext():
                quantize_rows_strided(self.x, self.q, self.scale, self.programs, self.side_warps,
                                      self.head_rows, self.ready, self.block_m)
        head = slice(0, self.head_rows)
        wt._prepare_quantize(self.x[head], None, self.q[head], self.scale[head])()
        compiled = _gemm_waiting_for_rows_kernel[(self.programs,)](*self.gemm_args, **self.gemm_constants)
        if rest and self.quantize_beside and self.side is not None:
            torch.cuda.current_stream().wait_stream(self.side)
        return compiled


def _warp_registers(registers_per_thread: int, warps: int) -> int:
    """Registers a kernel's program takes from the SM's file (allocated per warp in steps of 256)."""
    return warps * math.ceil(registers_per_thread * 32 / 256) * 256


def fits_one_sm(gemm: tuple[int, int, int], side: tuple[int, int, int]) -> bool:
    """Whether one program of each kernel, given as (registers per thread, warps, shared bytes), fit on an
    SM together (sm_90: 65,536 registers, 228 KB of shared memory less 1 KB per program)."""
    return (_warp_registers(*gemm[:2]) + _warp_registers(*side[:2]) <= SM_REGISTERS
            and gemm[2] + side[2] + 2 * BLOCK_RESERVED_SHARED_BYTES <= SM_SHARED_BYTES)


def probe_shape(m: int, k: int, n: int, slots: int, side: torch.cuda.Stream) -> dict:
    """Timings (ms), fit and checks of one layer shape; see the module docstring."""
    from dit_quant.kernels.w8a8_reference import quantize_rows_reference

    config = wt._HOPPER_WIDE
    x, x2, weight, weight_scale, q, scale, q2, scale2, out = quantize_beside_inputs(m, k, n)
    gemm_args = wt._tma_gemm_args(config, q, scale, weight, weight_scale, None, out, slots)
    gemm_constants = dict(wt._tma_gemm_constants(config, False, False, False))

    def gemm(cap):
        options = {} if cap is None else {"maxnreg": cap}
        return wt._w8a8_gemm_tma_kernel[(slots,)](*gemm_args, **gemm_constants, **options)

    def today():
        return wt.w8a8_linear_triton(x, weight, weight_scale, None, None, config)

    expected = today()
    q_ref, scale_ref = quantize_rows_reference(x)
    row = {"m": m, "k": k, "n": n, "today_ms": time_ms(today, graph=True),
           "quant_full_ms": time_ms(lambda: wt.quantize_rows_triton(x), graph=True), "gemm": {}, "side": {},
           "overlapped": []}
    for cap in REGISTER_CAPS:
        compiled = gemm(cap)
        row["gemm"][str(cap)] = {"ms": time_ms(lambda cap=cap: gemm(cap), graph=True),
                                 "regs": compiled.n_regs, "spills": compiled.n_spills,
                                 "shared": compiled.metadata.shared}
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

            fits = fits_one_sm((gemm_fit["regs"], config.num_warps, gemm_fit["shared"]),
                               (compiled.n_regs, warps, compiled.metadata.shared))
            entry["together"][str(cap)] = {"ms": time_ms(both, graph=True), "fits": fits}
        row["side"][warps] = entry
    for group_m in OVERLAP_GROUP_M:
        for cap in REGISTER_CAPS:
            control = OverlappedLinear(x, weight, weight_scale, out, config, group_m, slots, 1, cap, None,
                                       wait=False)
            waiting = control.run()
            entry = {"group_m": group_m, "cap": cap, "regs": waiting.n_regs, "spills": waiting.n_spills,
                     "control": _checked_ms(control, out, expected), "side_warps": {}}
            for warps in SIDE_WARPS:
                side_program = (row["side"][warps]["regs"], warps, row["side"][warps]["shared"])
                if fits_one_sm((waiting.n_regs, config.num_warps, waiting.metadata.shared), side_program):
                    overlapped = OverlappedLinear(x, weight, weight_scale, out, config, group_m, slots, warps,
                                                  cap, side)
                    entry["head_rows"] = overlapped.head_rows
                    entry["side_warps"][warps] = _checked_ms(overlapped, out, expected)
            row["overlapped"].append(entry)
    return row


def _checked_ms(linear: OverlappedLinear, out: torch.Tensor, expected: torch.Tensor) -> dict:
    """Whether ``linear.run()`` writes ``expected`` into ``out`` in three eager calls, each after its int8
    rows, scales and output were poisoned (so that a GEMM tile that read rows before they were written
    cannot pass on the last call's values), and its time (CUDA-graph replays); no time where a call was
    wrong. ``equal`` repeats the check after the replays; ``fallbacks``: row blocks the GEMM quantized
    itself during the checked calls and during the timing."""

    def poisoned_call_equal() -> bool:
        linear.q.fill_(99)
        linear.scale.fill_(float("nan"))
        out.fill_(float("nan"))
        linear.run()
        return torch.equal(out, expected)

    linear.fallbacks.zero_()
    checked = all([poisoned_call_equal() for _ in range(3)])
    fallbacks = {"checked_calls": int(linear.fallbacks.item())}
    if not checked:
        return {"equal": False, "ms": None, "fallbacks": fallbacks}
    linear.fallbacks.zero_()
    ms = time_ms(linear.run, graph=True)
    fallbacks["timing"] = int(linear.fallbacks.item())
    return {"equal": poisoned_call_equal(), "ms": ms, "fallbacks": fallbacks}


def table_rows(row: dict) -> list[list]:
    """One table line per (side warps, register cap) of a probed layer."""
    lines = []
    for warps, side in row["side"].items():
        for cap, together in side["together"].items():
            gemm = row["gemm"][cap]
            lines.append([f"{row['m']}x{row['k']}->{row['n']}", warps, cap, _us(row["today_ms"]),
                          _us(row["quant_full_ms"]), _us(gemm["ms"]), f"{gemm['regs']}/{gemm['spills']}",
                          _us(side["ms"]), f"{side['gb_s_per_program']:.1f}", _us(together["ms"]),
                          "yes" if together["fits"] else "no", f"{row['today_ms'] / together['ms']:.3f}",
                          "yes" if side["exact"] else "NO"])
    return lines


def _us(ms: float | None) -> str:
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def _fallbacks(timed: dict) -> str:
    """'checked calls / timing' row blocks the GEMM quantized itself."""
    counts = timed["fallbacks"]
    return f"{counts['checked_calls']}/{counts.get('timing', '-')}"


def overlapped_rows(row: dict) -> list[list]:
    """One table line per (GROUP_M, register cap, side warps) of a probed layer's overlapped version."""
    lines = []
    for entry in row["overlapped"]:
        control = entry["control"]
        for warps, timed in entry["side_warps"].items():
            speedup = "-" if timed["ms"] is None else f"{row['today_ms'] / timed['ms']:.3f}"
            lines.append([f"{row['m']}x{row['k']}->{row['n']}", entry["group_m"], entry["cap"],
                          f"{entry['regs']}/{entry['spills']}", entry["head_rows"], warps,
                          _us(row["today_ms"]), _us(control["ms"]),
                          "yes" if control["equal"] else "NO", _us(timed["ms"]), speedup,
                          "yes" if timed["equal"] else "NO", _fallbacks(timed)])
    return lines


def print_sm90_compile_report() -> None:
    """Compile the kernels for sm_90 without a GPU (tests/test_kernels_aot.py's helper, which needs a
    Triton wheel with ptxas and cuobjdump) and print, one JSON object per line: each GEMM (the pack's and
    the waiting one) at each register cap, each strided quantize program, and which pairs fit one SM."""
    aot = aot_compile_helpers()
    _compile = aot._compile
    config = wt._HOPPER_WIDE
    descriptors = dict(aot.tma_descriptor_types(config), a_scale_ptr="*fp32", b_scale_ptr="*fp32")
    tiles = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
             "GROUP_M": config.group_m, "SPLIT_EPILOGUE": config.split_epilogue}
    kernels = {
        "pack": (wt._w8a8_gemm_tma_kernel, dict(descriptors, bias_ptr="*bf16", M="i32", N="i32", K="i32",
                                                  num_programs="i32", **aot.GATE_TYPES),
                 dict(tiles, HAS_BIAS=False, GATED_ADD=False, ADD_IN_L2=True, WAIT_FOR_PRODUCER=False), {}),
        "waiting": (_gemm_waiting_for_rows_kernel,
                    dict(descriptors, x_ptr="*bf16", q_ptr="*i8", ready_ptr="*i32", fallbacks_ptr="*i32",
                         M="i32", N="i32", K="i32", num_programs="i32", first_waited_block="i32",
                         max_spins="i32"),
                    dict(tiles, FENCE=True, WAIT_FOR_PRODUCER=True, QUANT_BLOCK_K=QUANT_BLOCK_K),
                    {"enable_fp_fusion": False}),
    }
    gemms = {}
    for name, (kernel, signature, constants, kernel_options) in kernels.items():
        for cap in REGISTER_CAPS:
            options = dict(kernel_options, **({} if cap is None else {"maxnreg": cap}))
            report = _compile(kernel, dict(signature), dict(constants), 90, config.num_warps,
                              config.num_stages, **options)
            gemms[name, cap] = report
            print(json.dumps({"kernel": f"{name} GEMM", "maxnreg": cap, "wgmma_s8": report["wgmma_s8"],
                              "shared_bytes": report["shared"], **(report["resources"] or {})}), flush=True)
    side_signature = {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "ready_ptr": "*i32",
                      "first_row": "i32", "M": "i32", "K": "i32", "num_programs": "i32"}
    for warps, one_tile in itertools.product(SIDE_WARPS, (False, True)):
        report = _compile(_quantize_rows_strided_kernel, dict(side_signature),
                          {"BLOCK_K": 1024 * warps, "ONE_TILE": one_tile, "SIGNAL_BLOCK_M": config.block_m},
                          90, warps, 1, enable_fp_fusion=False)
        side = (report["resources"]["registers"], warps, report["shared"])
        fits = {cap: fits_one_sm((gemms["waiting", cap]["resources"]["registers"], config.num_warps,
                                  gemms["waiting", cap]["shared"]), side) for cap in REGISTER_CAPS}
        print(json.dumps({"kernel": "strided quantize", "warps": warps, "one_tile": one_tile,
                          "shared_bytes": report["shared"],
                          **report["resources"],
                          "fits_beside_waiting_gemm": {str(c): f for c, f in fits.items()}}), flush=True)


def _median_pair(m: int, k: int, n: int, slots: int, side: torch.cuda.Stream) -> dict:
    """One pair of ``median_sweep``: times (ms) and checks."""
    config = wt._HOPPER_WIDE
    layer = layer_inputs(m, k, n, seed=m + 3 * k + 5 * n, with_bias=False)
    x, weight, weight_scale = layer["x"], layer["weight"], layer["weight_scale"]
    expected = wt.w8a8_linear_triton(x, weight, weight_scale, None, None, config)
    out = torch.empty_like(expected)
    record = {"m": m, "k": k, "n": n,
              "bf16_ms": time_ms(lambda: torch.nn.functional.linear(x, layer["weight_bf16"]), graph=True),
              "today_ms": time_ms(lambda: wt.w8a8_linear_triton(x, weight, weight_scale, None, None, config),
                                  graph=True),
              "overlapped": {}}
    for group_m in OVERLAP_GROUP_M:
        linear = OverlappedLinear(x, weight, weight_scale, out, config, group_m, slots, 4, None, side)
        record["overlapped"][group_m] = _checked_ms(linear, out, expected)
    timed = [entry["ms"] for entry in record["overlapped"].values() if entry["ms"] is not None]
    record["overlapped_ms"] = min(timed) if timed else None
    return record


def median_sweep(slots: int, side: torch.cuda.Stream, env: dict, budget_s: float,
                 out_dir: str | None) -> None:
    """``--median``: at every M >= 1024 pair of the per-layer benchmark, bf16 ``F.linear``, today's path
    and the overlapped linear (4-warp side program, no register cap, both tile orders; the faster counts),
    both with the 128x256 tiles, CUDA-graph replays; their medians against bf16."""
    from bench_w8a8_layers import SHAPES as FAMILIES

    started, records, table = time.time(), [], []
    pairs = [(m, k, n) for shapes in FAMILIES.values() for k, n in shapes for m in (1024, 4096, 4608, 9216)]
    for m, k, n in pairs:
        if time.time() - started > budget_s:
            break
        record = _median_pair(m, k, n, slots, side)
        records.append(record)
        overlapped = record["overlapped_ms"]
        table.append([f"{m}x{k}->{n}", _us(record["bf16_ms"]), _us(record["today_ms"]),
                      *(_us(record["overlapped"][g]["ms"]) for g in OVERLAP_GROUP_M),
                      f"{record['bf16_ms'] / record['today_ms']:.2f}",
                      "-" if overlapped is None else f"{record['bf16_ms'] / overlapped:.2f}",
                      "yes" if all(e["equal"] for e in record["overlapped"].values()) else "NO",
                      " ".join(_fallbacks(e) for e in record["overlapped"].values())])
        print(table[-1], flush=True)
        torch.cuda.empty_cache()
    complete = [r for r in records if r["overlapped_ms"] is not None]
    summary = {"pairs": len(records), "pairs_planned": len(pairs),
               "median_today_vs_bf16": statistics.median(r["bf16_ms"] / r["today_ms"] for r in records),
               "median_overlapped_vs_bf16": statistics.median(r["bf16_ms"] / r["overlapped_ms"]
                                                              for r in complete) if complete else None}
    headers = ["layer", "bf16 µs", "today µs", *(f"overlapped GROUP_M {g} µs" for g in OVERLAP_GROUP_M),
               "bf16 / today", "bf16 / overlapped", "= today", "GEMM's own blocks (checked/timed)"]
    notes = [f"- {name}: {value:.3f}" if isinstance(value, float) else f"- {name}: {value}"
             for name, value in summary.items()]
    markdown = probe_markdown("Overlapped quantization at every M >= 1024 pair", env, __doc__,
                              markdown_table(headers, table), "\n".join(notes))
    save_results("probe_quant_coresident_median",
                 {"environment": env, "summary": summary, "results": records}, markdown, out_dir)
    print(markdown)


def _options(parser) -> None:
    parser.add_argument("--median", action="store_true",
                        help="time the overlapped linear at every M >= 1024 pair of the per-layer benchmark")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="--median: stop starting pairs after this")


def main() -> int:
    args = probe_arguments(__doc__, "probe_quant_coresident", print_sm90_compile_report, _options)
    if args is None:
        return 0
    slots = wt.program_slots(torch.device("cuda"))
    side = torch.cuda.Stream()
    env = environment()
    if args.median:
        median_sweep(slots, side, env, args.budget_s, args.out)
        return 0
    results, table, overlapped = [], [], []
    headers = ["layer", "side warps", "GEMM maxnreg", "today µs", "quant µs", "GEMM µs", "GEMM regs/spills",
               "side quant µs", "GB/s per program", "both at once µs", "fit one SM", "today / both", "= ref"]
    overlapped_headers = ["layer", "GROUP_M", "GEMM maxnreg", "GEMM regs/spills", "first-wave rows",
                          "side warps", "today µs", "control µs", "control = today", "overlapped µs",
                          "today / overlapped", "= today", "GEMM's own blocks (checked/timed)"]
    for m, k, n in SHAPES:
        row = probe_shape(m, k, n, slots, side)
        results.append(row)
        for line in table_rows(row):
            table.append(line)
            print(line, flush=True)
        for line in overlapped_rows(row):
            overlapped.append(line)
            print(line, flush=True)
        markdown = probe_markdown("Quantization beside the GEMM on every SM", env, __doc__,
                                  markdown_table(headers, table), "Overlapped (flag-synchronized) version:",
                                  markdown_table(overlapped_headers, overlapped))
        # after every layer: a run cut short keeps what it measured
        save_results("probe_quant_coresident", {"environment": env, "results": results}, markdown, args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
