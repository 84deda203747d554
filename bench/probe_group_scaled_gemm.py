"""Probe: can the activation quantization run inside the GEMM, with no separate pass, fast enough to beat
the pack's quantize kernel + int8 GEMM at M >= 1024? (GPU time, CUDA-graph replays, L2 flushed.)

The separate pass reads 2 and writes 1 byte per activation element before the GEMM starts, and the
model of scripts/quantization_gap.py puts the per-layer median at 1.64x bf16 without it (1.46x with it,
run 21). A per-row scale needs the whole row's amax before the first K step, which is why the run-2
quantize-on-load kernel (scales over the whole K in every program) lost. Two in-GEMM forms avoid that:
- "group": one scale per row and K block (a 1 x BLOCK_K group, computed from the bf16 tile in the K loop);
  each K step's int32 partial product is scaled into an fp32 accumulator (the promotion DeepSeek's fp8
  GEMMs use). More accurate than one scale per row; costs a CUDA-core pass over the accumulator per step
  (PROMOTE_EVERY K steps share one group to halve that).
- "rowscale": an amax-only pass (reads 2 bytes per element, writes one scale per row), then a GEMM that
  reads the bf16 A tiles and quantizes them with the known row scale (the pack's scheme; checked against
  the pack's own output).
Both read A through TMA as bf16 and run persistent, one program per SM (4-warp variants also two per
SM). For each layer this times bf16 F.linear, the pack's W8A8 linear (autotuned) and every variant
below, after checking each variant against a float64 evaluation of its own quantization scheme.

    python bench/probe_group_scaled_gemm.py [--out DIR]
    python bench/probe_group_scaled_gemm.py --aot   # no GPU: compile every variant for sm_90 and print
                                                    # shared memory, registers, spills, wgmma waits

Writes probe_group_scaled_gemm.{json,md} to bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from w8a8_common import (
    aot_compile_helpers,
    compare,
    environment,
    import_kernels,
    layer_inputs,
    markdown_table,
    probe_arguments,
    probe_markdown,
    save_results,
    time_ms,
)

kernels = import_kernels()
from dit_quant.kernels.w8a8_triton import (  # noqa: E402
    _epilogue,
    _round_to_int8,
    _row_scale,
    _row_scale_of,
    _tile_coords,
)

LAYERS = [(4608, 3072, 3072), (4608, 3072, 12288), (1024, 3072, 3072), (4608, 12288, 3072),
          (4608, 2304, 2304), (9216, 3072, 3072)]
# (block_m, block_n, block_k, warps, stages, promote_every) for "group" (promote_every -1: 1 with SKEW);
# promote_every is 0 for "rowscale".
# All compile for sm_90 without spills (local AOT check); 128 x 256 tiles spill with the two accumulators.
GROUP_VARIANTS = [(128, 128, 128, 8, 3, 1), (128, 128, 64, 8, 5, 1), (128, 128, 64, 8, 3, 2),
                  (64, 128, 128, 4, 3, 1), (128, 128, 128, 8, 3, -1), (64, 128, 128, 4, 3, -1)]
ROWSCALE_VARIANTS = [(128, 256, 128, 8, 3, 0), (128, 256, 64, 8, 4, 0)]
GROUP_M = 8


@triton.jit
def _group_scaled_gemm_kernel(x_desc, w_desc, out_desc, w_scale_ptr, bias_ptr, M, N, K, num_programs,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr,
                              PROMOTE_EVERY: tl.constexpr, SKEW: tl.constexpr):
    """out = sum over K groups g of s_g[:, None] * (q_g @ w_g.T), times w_scale (+ bias); q_g, s_g: the
    int8 values and fp32 row scales of x's 1 x (PROMOTE_EVERY * BLOCK_K) group g (PROMOTE_EVERY: 1 or 2),
    computed here. SKEW (PROMOTE_EVERY 1): group g + 1 is quantized between group g's MMA and its
    promotion, so that Triton's wait for the asynchronous MMA comes after the quantization."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SKEW:
            x = x_desc.load([off_m, 0]).to(tl.float32)
            scale, inverse = _row_scale(tl.max(tl.abs(x), axis=1))
            q = _round_to_int8(x * inverse[:, None])
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                part = tl.dot(q, w_desc.load([off_n, k0]).T, out_dtype=tl.int32)
                x = x_desc.load([off_m, k0 + BLOCK_K]).to(tl.float32)  # past K: zero-filled, unused
                next_scale, next_inverse = _row_scale(tl.max(tl.abs(x), axis=1))
                q = _round_to_int8(x * next_inverse[:, None])
                acc += part.to(tl.float32) * scale[:, None]
                scale = next_scale
        else:
            for k0 in tl.range(0, K, BLOCK_K * PROMOTE_EVERY, num_stages=STAGES):
                x = x_desc.load([off_m, k0]).to(tl.float32)
                w = w_desc.load([off_n, k0])
                amax = tl.max(tl.abs(x), axis=1)
                if PROMOTE_EVERY == 2:
                    x_next = x_desc.load([off_m, k0 + BLOCK_K]).to(tl.float32)
                    w_next = w_desc.load([off_n, k0 + BLOCK_K])
                    amax = tl.maximum(amax, tl.max(tl.abs(x_next), axis=1))
                scale, inverse = _row_scale(amax)
                part = tl.dot(_round_to_int8(x * inverse[:, None]), w.T, out_dtype=tl.int32)
                if PROMOTE_EVERY == 2:
                    part = tl.dot(_round_to_int8(x_next * inverse[:, None]), w_next.T, part,
                                  out_dtype=tl.int32)
                acc += part.to(tl.float32) * scale[:, None]
        cols = (off_n + tl.arange(0, BLOCK_N)) % N
        out = acc * tl.load(w_scale_ptr + cols)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], out.to(out_desc.dtype))


@triton.jit
def _row_amax_kernel(x_ptr, scale_ptr, inverse_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """One program per row: the pack's row scale and its reciprocal (no int8 row written)."""
    row = tl.program_id(0).to(tl.int64)
    scale, inverse = _row_scale_of(x_ptr + row * stride_xm, x_ptr, K, False, BLOCK_K)
    tl.store(scale_ptr + row, scale)
    tl.store(inverse_ptr + row, inverse)


@triton.jit
def _rowscale_gemm_kernel(x_desc, w_desc, out_desc, scale_ptr, inverse_ptr, w_scale_ptr, bias_ptr,
                          M, N, K, num_programs, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          STAGES: tl.constexpr):
    """The pack's W8A8 linear with the row scales given: bf16 A tiles quantized on load."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = (off_m + tl.arange(0, BLOCK_M)) % M
        inverse = tl.load(inverse_ptr + rows)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = x_desc.load([off_m, k0]).to(tl.float32)
            w = w_desc.load([off_n, k0])
            acc = tl.dot(_round_to_int8(x * inverse[:, None]), w.T, acc, out_dtype=tl.int32)
        cols = (off_n + tl.arange(0, BLOCK_N)) % N
        out = _epilogue(acc, tl.load(scale_ptr + rows), w_scale_ptr, bias_ptr, cols, HAS_BIAS)
        out_desc.store([off_m, off_n], out.to(out_desc.dtype))


def _descriptors(x, weight, out, block_m, block_n, block_k):
    return (TensorDescriptor.from_tensor(x, [block_m, block_k]),
            TensorDescriptor.from_tensor(weight, [block_n, block_k]),
            TensorDescriptor.from_tensor(out, [block_m, block_n]))


def group_scaled_linear(x, weight, weight_scale, bias, out, variant, programs: int):
    """out = the "group" scheme's linear (see the module docstring); x bf16 [M, K], weight int8 [N, K].
    Returns the compiled GEMM (registers, spills, assembly)."""
    block_m, block_n, block_k, warps, stages, promote = variant
    skew = promote == -1
    m, k = x.shape
    return _group_scaled_gemm_kernel[(programs,)](
        *_descriptors(x, weight, out, block_m, block_n, block_k), weight_scale, bias, m, weight.shape[0],
        k, programs, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=GROUP_M, STAGES=stages, PROMOTE_EVERY=1 if skew else promote, SKEW=skew, num_warps=warps,
        enable_fp_fusion=False)


def rowscale_linear(x, weight, weight_scale, bias, out, scale, inverse, variant, programs: int):
    """out = the pack's W8A8 linear as an amax pass + a quantize-on-load GEMM; returns the compiled GEMM."""
    block_m, block_n, block_k, warps, stages, _ = variant
    m, k = x.shape
    _row_amax_kernel[(m,)](x, scale, inverse, k, x.stride(0), BLOCK_K=triton.next_power_of_2(k),
                           num_warps=8, enable_fp_fusion=False)
    return _rowscale_gemm_kernel[(programs,)](
        *_descriptors(x, weight, out, block_m, block_n, block_k), scale, inverse, weight_scale, bias, m,
        weight.shape[0], k, programs, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=GROUP_M, STAGES=stages, num_warps=warps, enable_fp_fusion=False)


def group_scaled_reference(x, weight, weight_scale, bias, group: int) -> torch.Tensor:
    """float64 evaluation of the "group" scheme (its int8 values and scales computed as the kernel does,
    in fp32 with IEEE division), for x bf16 [M, K] with K a multiple of ``group``."""
    m, k = x.shape
    xg = x.float().view(m, k // group, group)
    scale = torch.clamp(xg.abs().amax(dim=2), min=1e-12) / 127.0
    q = torch.round(xg * (1.0 / scale)[:, :, None])
    wg = weight.double().view(weight.shape[0], k // group, group)
    out = torch.einsum("mgk,ngk->mn", q.double() * scale.double()[:, :, None], wg) * weight_scale.double()
    return out + bias.double() if bias is not None else out


def probe_layer(m: int, k: int, n: int, slots: int) -> dict:
    """Checks and timings (ms) of one layer; see the module docstring."""
    inputs = layer_inputs(m, k, n, seed=m + k + n)
    x, weight, weight_scale, bias = inputs["x"], inputs["weight"], inputs["weight_scale"], inputs["bias"]
    exact = torch.nn.functional.linear(x.double(), weight.double() * weight_scale.double()[:, None],
                                       bias.double())
    pack_out = kernels.w8a8_linear(x, weight, weight_scale, bias)
    row = {"m": m, "k": k, "n": n,
           "bf16_ms": time_ms(lambda: torch.nn.functional.linear(x, inputs["weight_bf16"], bias), graph=True),
           "pack_ms": time_ms(lambda: kernels.w8a8_linear(x, weight, weight_scale, bias), graph=True),
           "pack_err_vs_float": compare(pack_out, exact)["max_rel_err"], "variants": []}
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    scale = torch.empty(m, device="cuda", dtype=torch.float32)
    inverse = torch.empty_like(scale)
    for variant in GROUP_VARIANTS + ROWSCALE_VARIANTS:
        entry = {"variant": list(variant), "kind": "group" if variant[5] else "rowscale"}
        if entry["kind"] == "group":
            def run(v=variant, programs=slots):
                return group_scaled_linear(x, weight, weight_scale, bias, out, v, programs)
            reference = group_scaled_reference(x, weight, weight_scale, bias, variant[2] * abs(variant[5]))
        else:
            def run(v=variant, programs=slots):
                return rowscale_linear(x, weight, weight_scale, bias, out, scale, inverse, v, programs)
            reference = pack_out.double()
        try:
            out.fill_(float("nan"))
            compiled = run()
            entry["spills"] = compiled.n_spills
            entry["wgmma"] = "wgmma" in compiled.asm.get("ptx", "")
            entry["err_vs_scheme"] = compare(out, reference)["max_rel_err"]
            entry["err_vs_float"] = compare(out, exact)["max_rel_err"]
            entry["ms"] = time_ms(run, graph=True)
            if variant[3] == 4:  # two programs per SM: one's quantization may overlap the other's MMAs
                entry["ms_two_per_sm"] = time_ms(lambda: run(programs=2 * slots), graph=True)
        except Exception as error:  # noqa: BLE001 - a variant that does not compile or launch is reported
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(m, k, n, entry, flush=True)
        row["variants"].append(entry)
    return row


def _fastest(entry: dict) -> float:
    return min(entry["ms"], entry.get("ms_two_per_sm", entry["ms"]))


def print_sm90_compile_report() -> None:
    """Compile every variant for sm_90 without a GPU (tests/test_kernels_aot.py's helper, which needs a
    Triton wheel with ptxas and cuobjdump) and print what limits it before any timing, one JSON object
    per line."""
    _compile = aot_compile_helpers()._compile
    for variant in GROUP_VARIANTS + ROWSCALE_VARIANTS:
        block_m, block_n, block_k, warps, stages, promote = variant
        signature = {"x_desc": f"tensordesc<bf16[{block_m}, {block_k}]>",
                     "w_desc": f"tensordesc<i8[{block_n}, {block_k}]>",
                     "out_desc": f"tensordesc<bf16[{block_m}, {block_n}]>"}
        constants = {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                     "GROUP_M": GROUP_M, "STAGES": stages}
        if promote:
            kernel = _group_scaled_gemm_kernel
            constants.update(PROMOTE_EVERY=max(promote, 1), SKEW=promote == -1)
        else:
            kernel = _rowscale_gemm_kernel
            signature.update(scale_ptr="*fp32", inverse_ptr="*fp32")
        signature.update(w_scale_ptr="*fp32", bias_ptr="*bf16", M="i32", N="i32", K="i32", num_programs="i32")
        report = _compile(kernel, signature, constants, 90, warps, stages, enable_fp_fusion=False)
        line = {"variant": variant, "wgmma_s8": report["wgmma_s8"], "shared_bytes": report["shared"],
                **(report["resources"] or {}), "wgmma_wait_pendings": report["wgmma_wait_pendings"]}
        print(json.dumps(line), flush=True)


def main() -> int:
    args = probe_arguments(__doc__, "probe_group_scaled_gemm", print_sm90_compile_report)
    if args is None:
        return 0
    slots = kernels.w8a8_triton.program_slots(torch.device("cuda"))
    env = environment()
    results, table = [], []
    for m, k, n in LAYERS:
        row = probe_layer(m, k, n, slots)
        results.append(row)
        cells = [f"{m}x{k}->{n}", f"{row['bf16_ms'] * 1e3:.1f}", f"{row['pack_ms'] * 1e3:.1f}",
                 f"{row['bf16_ms'] / row['pack_ms']:.2f}"]
        for kind in ("group", "rowscale"):
            timed = [v for v in row["variants"] if v["kind"] == kind and "ms" in v
                     and v["err_vs_scheme"] < 1e-2]
            best = min(timed, key=_fastest, default=None)
            cells += (["-", "-", "-"] if best is None else
                      [f"{_fastest(best) * 1e3:.1f}", f"{row['bf16_ms'] / _fastest(best):.2f}",
                       "/".join(str(p) for p in best["variant"])
                       + (" x2" if best.get("ms_two_per_sm", 1e9) < best["ms"] else "")])
        table.append(cells)
        print(cells, flush=True)
        _save(env, results, table, args.out)  # after every layer: a run cut short keeps what it measured
    return 0


def _save(env: dict, results: list[dict], table: list[list], out_dir: str | None) -> None:
    headers = ["layer M x K -> N", "bf16 µs", "pack µs", "pack vs bf16", "group µs", "group vs bf16",
               "group config", "rowscale µs", "rowscale vs bf16", "rowscale config"]
    markdown = probe_markdown("Quantization inside the GEMM", env, __doc__, markdown_table(headers, table),
                              "Configs: block_m/block_n/block_k/warps/stages/promote_every (x2: two "
                              "programs per SM). Variants are counted only where they match their "
                              "scheme's float64 evaluation (max rel. err < 1e-2); errors against the "
                              "float linear are in the JSON.")
    save_results("probe_group_scaled_gemm", {"environment": env, "results": results}, markdown, out_dir)


if __name__ == "__main__":
    raise SystemExit(main())
