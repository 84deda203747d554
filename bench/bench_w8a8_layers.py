"""Per-layer benchmark of the W8A8 linear at DiT shapes against the other paths a user could pick, in one
run: bf16 F.linear (cuBLAS), torch._int_mm + eager quantization/scaling, fp8 rowwise torch._scaled_mm
(with eager activation quantization, and operands pre-quantized = the GEMM alone), comfy-kitchen's
Triton int8_linear (if importable). Every path is checked against the torch reference before timing.
Writes bench_w8a8_layers.{json,md} to bench/results/ and --out ($OUT).

    python bench/bench_w8a8_layers.py [--out DIR] [--sweep] [--compare-pdl] [--budget-s 420] [--m 1,16,...]

--compare-pdl adds our linear with the GEMM launched the plain way (no programmatic dependent launch).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from w8a8_common import (
    arg_parser,
    compare,
    environment,
    import_kernels,
    layer_inputs,
    markdown_table,
    require_cuda,
    save_results,
    time_ms,
)

# (K, N) per model family: Flux (hidden 3072), Lumina2/Z-Image (2304, 3840), Wan 14B (5120).
SHAPES = {
    3072: [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 21504)],
    2304: [(2304, 2304), (2304, 9216), (9216, 2304)],
    3840: [(3840, 3840), (3840, 10240), (10240, 3840)],
    5120: [(5120, 5120), (5120, 13824), (13824, 5120)],
}
M_VALUES = (1, 16, 256, 1024, 4096, 4608, 9216)


def _quantize_fp8_rows(x: torch.Tensor):
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


OURS, OURS_NO_PDL, BF16 = "W8A8 (ours)", "W8A8 (ours), no PDL", "bf16 F.linear"
KITCHEN, FP8_GEMM = "comfy-kitchen int8_linear", "fp8 rowwise GEMM only"
GRAPH_TIMED = (BF16, OURS, OURS_NO_PDL)  # also timed as CUDA-graph replays: GPU time without host cost
# Baselines also graph-timed where they capture (a library that syncs the host cannot): the comparison
# with comfy-kitchen and cuBLAS's fp8 GEMM then holds on GPU time too, not only on host-bound eager time.
GRAPH_TIMED_IF_CAPTURABLE = (KITCHEN, FP8_GEMM)


def _without_pdl(fn):
    """``fn`` run with the GEMM launched without programmatic dependent launch."""
    from dit_quant.kernels import w8a8_triton

    def run():
        before, w8a8_triton.USE_PDL = w8a8_triton.USE_PDL, False
        try:
            return fn()
        finally:
            w8a8_triton.USE_PDL = before

    return run


def _baselines(t: dict, kernels, compare_pdl: bool) -> dict:
    """name -> callable for the comparison paths (those this GPU/torch/package set supports)."""
    from dit_quant.kernels.w8a8_reference import quantize_rows_reference

    x, w, ws, bias = t["x"], t["weight"], t["weight_scale"], t["bias"]
    paths = {BF16: lambda: F.linear(x, t["weight_bf16"], bias)}
    if x.shape[0] > 16:  # cuBLASLt int8 needs M > 16

        def int_mm_eager():
            q, s = quantize_rows_reference(x)
            return (torch._int_mm(q, w.t()).float() * s[:, None] * ws[None, :] + bias.float()).bfloat16()

        paths["_int_mm + eager quant"] = int_mm_eager
    if torch.cuda.get_device_capability() >= (8, 9):
        w_fp8, w_scale = _quantize_fp8_rows(t["weight_bf16"])
        x_fp8, x_scale = _quantize_fp8_rows(x)

        def fp8_rowwise(a=None, a_scale=None):
            if a is None:
                a, a_scale = _quantize_fp8_rows(x)
            return torch._scaled_mm(a, w_fp8.t(), scale_a=a_scale, scale_b=w_scale.t().contiguous(),
                                    bias=bias, out_dtype=torch.bfloat16)

        paths["fp8 rowwise + eager quant"] = fp8_rowwise
        paths[FP8_GEMM] = lambda: fp8_rowwise(x_fp8, x_scale)
    try:
        from comfy_kitchen.backends.triton.quantization import int8_linear as kitchen_int8_linear

        paths[KITCHEN] = lambda: kitchen_int8_linear(x, w, ws, bias, out_dtype=torch.bfloat16)
    except ImportError:
        pass
    paths[OURS] = lambda: kernels.w8a8_linear(x, w, ws, bias, backend="triton")
    if compare_pdl:
        paths[OURS_NO_PDL] = _without_pdl(paths[OURS])
    return paths


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--sweep", action="store_true",
                        help="also time every candidate config of ours for each M's regime (GPU time)")
    parser.add_argument("--compare-pdl", action="store_true",
                        help="also time ours without programmatic dependent launch")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new shapes after this")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated M values")
    parser.add_argument("--hidden", default=",".join(map(str, SHAPES)), help="comma-separated hidden sizes")
    parser.add_argument("--print-table", action="store_true", help="print the whole table, not the summary")
    parser.add_argument("--stem", default="bench_w8a8_layers", help="result file name (without suffix)")
    args = parser.parse_args()
    require_cuda("bench_w8a8_layers")
    kernels = import_kernels()
    from dit_quant.kernels import w8a8_triton
    from dit_quant.kernels.w8a8_autotune import applicable_configs, choose_config

    env = environment()
    cc = w8a8_triton.arch_key(torch.cuda.get_device_capability())
    started, truncated, records = time.time(), False, []
    for hidden in map(int, args.hidden.split(",")):
        for k, n in SHAPES[hidden]:
            for m in map(int, args.m.split(",")):
                if time.time() - started > args.budget_s:
                    truncated = True
                    break
                t = layer_inputs(m, k, n, seed=m + 3 * k + 5 * n)
                layer = (t["x"], t["weight"], t["weight_scale"], t["bias"])
                reference = kernels.w8a8_linear(*layer, backend="torch")
                record = {"hidden": hidden, "m": m, "k": k, "n": n, "paths": {}}
                for name, fn in _baselines(t, kernels, args.compare_pdl).items():
                    try:
                        entry = {**compare(fn(), reference), "ms": time_ms(fn)}
                    except RuntimeError as exc:  # e.g. a shape a baseline's library refuses
                        if name in GRAPH_TIMED:
                            raise
                        print(f"  {name} skipped at M={m} K={k} N={n}: {exc}"[:300])
                        continue
                    if name in GRAPH_TIMED:
                        entry["graph_ms"] = time_ms(fn, graph=True)
                        entry["fresh_graph_ms"] = time_ms(fn, graph=True, produced=t["x"])
                    elif name in GRAPH_TIMED_IF_CAPTURABLE:
                        try:
                            entry["graph_ms"] = time_ms(fn, graph=True)
                        except RuntimeError as exc:  # recorded: the eager time still stands
                            entry["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    record["paths"][name] = entry
                config = choose_config(t["x"], t["weight"], t["weight_scale"], t["bias"], None)
                record["config"], record["config_label"] = str(config), _label(config)
                if args.sweep:
                    configs = applicable_configs(
                        w8a8_triton.candidate_configs(cc, w8a8_triton.m_regime(m)), m, n,
                        w8a8_triton.tma_compatible(t["weight"], torch.bfloat16), False,
                        w8a8_triton.program_slots(t["x"].device))
                    record["sweep"] = {}
                    for config in configs:
                        fn = lambda c=config, layer=layer: w8a8_triton.w8a8_linear_triton(*layer, None, c)  # noqa: E731
                        try:
                            record["sweep"][str(config)] = {**compare(fn(), reference),
                                                            "graph_ms": time_ms(fn, graph=True)}
                        except Exception as exc:  # a config this GPU rejects is recorded, not fatal
                            record["sweep"][str(config)] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                records.append(record)
                print(f"[{time.time() - started:6.1f}s] M={m} K={k} N={n} " + " ".join(
                    f"{name}={p['ms'] * 1e3:.1f}us" for name, p in record["paths"].items()), flush=True)
                del t, layer, reference
                torch.cuda.empty_cache()

    summary, markdown = _summarize(records, env, truncated)
    save_results(args.stem, {"environment": env, "truncated": truncated, "summary": summary,
                                       "results": records}, markdown, args.out)
    print(markdown if args.print_table else markdown.split("\n|")[0])


def _label(config) -> str:
    """'tma 128x256', with '+ tail 128x128' where rows past the last full wave run with smaller tiles;
    'int8 16x32 + prefetch' where the GEMM prefetches weights while waiting for the quantization."""
    main, *tails = config.launches()
    prefetch = " + prefetch" if main.prefetch_weights else ""
    return " + tail ".join([f"{main.kind} {main.block_m}x{main.block_n}{prefetch}"]
                           + [f"{t.block_m}x{t.block_n}" for t in tails])


def _summarize(records: list[dict], env: dict, truncated: bool) -> tuple[dict, str]:
    names = list(dict.fromkeys(name for r in records for name in r["paths"]))
    rows = []
    for r in records:
        bf16 = r["paths"][BF16]["ms"]
        ours = r["paths"][OURS]
        row = [r["m"], r["k"], r["n"], f"{ours['ms'] * 1e3:.1f}"]
        row += [f"{bf16 / r['paths'][name]['ms']:.2f}" if name in r["paths"] else "-" for name in names]
        row.append(f"{r['paths'][BF16]['graph_ms'] / ours['graph_ms']:.2f}")
        row.append(f"{r['paths'][BF16]['fresh_graph_ms'] / ours['fresh_graph_ms']:.2f}")
        kitchen_graph = r["paths"].get(KITCHEN, {}).get("graph_ms")
        row.append(f"{kitchen_graph / ours['graph_ms']:.2f}" if kitchen_graph else "-")
        if OURS_NO_PDL in r["paths"]:
            row.append(f"{r['paths'][BF16]['graph_ms'] / r['paths'][OURS_NO_PDL]['graph_ms']:.2f}")
        row.append(f"{ours['max_rel_err']:.1e}")
        row.append(r["config_label"])
        rows.append(row)

    def ratios(select, name=OURS, base=BF16, key="ms"):
        return [r["paths"][base][key] / r["paths"][name][key] for r in records
                if select(r["m"]) and name in r["paths"] and base in r["paths"]]

    large, small = ratios(lambda m: m >= 1024), ratios(lambda m: m <= 64)
    large_graph = ratios(lambda m: m >= 1024, key="graph_ms")
    small_graph = ratios(lambda m: m <= 64, key="graph_ms")
    large_fresh = ratios(lambda m: m >= 1024, key="fresh_graph_ms")
    small_fresh = ratios(lambda m: m <= 64, key="fresh_graph_ms")
    large_graph_no_pdl = ratios(lambda m: m >= 1024, name=OURS_NO_PDL, key="graph_ms")
    vs_kitchen = ratios(lambda m: m >= 1024, base=KITCHEN)
    fp8 = ratios(lambda m: m >= 1024, name=FP8_GEMM)
    graph_vs_kitchen = [r["paths"][KITCHEN]["graph_ms"] / r["paths"][OURS]["graph_ms"] for r in records
                        if r["m"] >= 1024 and "graph_ms" in r["paths"].get(KITCHEN, {})]
    fp8_graph = [r["paths"][BF16]["graph_ms"] / r["paths"][FP8_GEMM]["graph_ms"] for r in records
                 if r["m"] >= 1024 and "graph_ms" in r["paths"].get(FP8_GEMM, {})]
    summary = {
        "median_speedup_vs_bf16_m_ge_1024": statistics.median(large) if large else None,
        "median_speedup_vs_bf16_m_le_64": statistics.median(small) if small else None,
        "min_speedup_vs_bf16_m_le_64": min(small) if small else None,
        "graph_median_speedup_vs_bf16_m_ge_1024": statistics.median(large_graph) if large_graph else None,
        "graph_median_speedup_vs_bf16_m_le_64": statistics.median(small_graph) if small_graph else None,
        # the activation freshly written before each call, as in a model (see time_ms's ``produced``)
        "graph_fresh_input_median_speedup_vs_bf16_m_ge_1024": statistics.median(large_fresh) if large_fresh
        else None,
        "graph_fresh_input_min_speedup_vs_bf16_m_le_64": min(small_fresh) if small_fresh else None,
        "shapes_m_ge_1024_faster_than_comfy_kitchen": f"{sum(v > 1 for v in vs_kitchen)}/{len(vs_kitchen)}",
        "min_speedup_vs_comfy_kitchen_m_ge_1024": min(vs_kitchen) if vs_kitchen else None,
        # cuBLAS's 8-bit GEMM with both operands already quantized: the vendor's ceiling on these shapes
        "fp8_gemm_only_median_vs_bf16_m_ge_1024": statistics.median(fp8) if fp8 else None,
        "graph_shapes_m_ge_1024_faster_than_comfy_kitchen":
            f"{sum(v > 1 for v in graph_vs_kitchen)}/{len(graph_vs_kitchen)}" if graph_vs_kitchen else None,
        "graph_min_speedup_vs_comfy_kitchen_m_ge_1024": min(graph_vs_kitchen) if graph_vs_kitchen else None,
        "graph_fp8_gemm_only_median_vs_bf16_m_ge_1024": statistics.median(fp8_graph) if fp8_graph else None,
    }
    if large_graph_no_pdl:
        summary["graph_median_speedup_vs_bf16_m_ge_1024_without_pdl"] = statistics.median(large_graph_no_pdl)
    headers = ["M", "K", "N", "ours µs"] + [f"{name} (x bf16)" for name in names]
    headers += ["ours graph (x bf16 graph)", "ours graph, x just written (x bf16 graph, same)",
                "ours graph (x comfy-kitchen graph)"]
    if any(OURS_NO_PDL in r["paths"] for r in records):
        headers.append("ours graph, no PDL (x bf16 graph)")
    headers += ["ours max rel err", "our kind"]
    markdown = (
        f"# W8A8 per-layer benchmark\n\n{env['gpu']} (sm_{env['compute_capability']}), "
        f"driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}\n\n"
        f"Command: `{env['command']}` "
        f"({env['date_utc']}){' — TRUNCATED by the time budget' if truncated else ''}\n\n"
        "Cells are speed relative to bf16 F.linear in the same run (bf16 time / path time; > 1 is faster); "
        "median of triton.testing.do_bench with L2 flushed, eager unless marked graph; quantization of the "
        "activation included except in 'GEMM only'. 'x just written': L2 emptied by a 256 MB read, then the "
        "activation rewritten before each call, as the op before a linear layer leaves it (do_bench's flush "
        "instead leaves 256 MB of dirty zeros in L2, written back during the timed call).\n\n"
        + "\n".join(f"- {key}: {value if not isinstance(value, float) else f'{value:.2f}'}"
                    for key, value in summary.items())
        + "\n\n" + markdown_table(headers, rows) + "\n"
    )
    return summary, markdown


if __name__ == "__main__":
    main()
