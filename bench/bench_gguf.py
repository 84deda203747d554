"""GGUF on the GPU in one run: correctness first, then per-layer GEMMs and a full-size Flux denoising step.

1. Checks (the run stops with exit code 1 if any fails; results are still written):
   - Triton dequantization of all 15 types bit-identical to ``gguf.quants.dequantize`` (random bytes);
   - the K-quant encoder on the GPU writes the same bytes as on the CPU;
   - the fused dequantize-and-multiply kernel (all 8 fused types) and the INT8 Q8_0 kernel vs float
     references.
2. Per-layer GEMMs at Flux shapes (M = 4608 tokens of a 1024x1024 image, M = 512 text tokens, M = 16 and
   M = 1 as the modulation layers see): bf16 ``F.linear`` (cuBLAS), plain-torch dequantize + ``F.linear``
   (what the common ComfyUI GGUF loader does),
   Triton dequantize + ``F.linear``, our fused kernel (Q8_0, Q4_K), "auto" (what the loader runs: fused
   or dequantize + cuBLAS, per ``gguf_dispatch.fused_wins``) and the INT8 Q8_0 option. With --sweep
   (default) every candidate tile of the fused kernel is timed on one shape.
3. One denoising step of ComfyUI's own Flux class at flux-dev size (random weights, 1024x1024, bf16) with
   the same paths; weight bytes of each variant. Target: ours ("auto") at Q8_0 and Q4_K <= 1.05x bf16's
   step time with <= 0.55x / <= 0.32x of its weight bytes. Also bf16 and "auto" with every Flux block on
   the pack's fused forward (the "Fused Flux Blocks" node), timed against stock bf16 and bf16 + fused blocks,
   and the same replayed from CUDA graphs (the "DiT CUDA Graphs" node) against bf16 + fused blocks + graph.

    python bench/bench_gguf.py [--out DIR] [--no-sweep] [--steps 5]

Needs the ``gguf`` package (pure Python) and, for part 3, ComfyUI (COMFYUI_PATH or .cache/ComfyUI, with
einops, psutil, tqdm and Pillow importable). Writes bench_gguf.{json,md} to bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from flux_common import (
    build_flux,
    cuda_graphed,
    flux_inputs,
    fused_blocks,
    import_comfy_module,
    release,
    tensor_bytes,
    time_step,
)
from w8a8_common import (
    arg_parser,
    environment,
    import_kernels,
    markdown_table,
    require_cuda,
    save_results,
    time_ms,
)

# (K, N) of Flux's Linear layers (hidden 3072): attention qkv / out, MLP up / down, single-block in / out.
FLUX_SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
QUANT_TYPES = ("Q8_0", "Q4_K")
SWEEP_SHAPE = (3072, 12288)


def fail(checks: list, name: str, ok: bool, detail: str) -> None:
    checks.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def quantize_weight(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """float weight [N, K] (cuda) -> GGUF bytes uint8 [N, row_bytes] on the same device."""
    import gguf
    from dit_quant.quant.gguf_kquants import quantize_kquant

    if qtype.endswith("_K"):
        return quantize_kquant(weight.float(), qtype)
    packed = gguf.quants.quantize(weight.float().cpu().numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(packed).to(weight.device)


# ----------------------------------------------------------------------------- 1. checks


def check_dequant(checks: list) -> None:
    import gguf
    from dit_quant.kernels.gguf_dequant_reference import BLOCK_LAYOUT
    from dit_quant.kernels.gguf_dequant_triton import TRITON_TYPES, dequantize_triton

    rng = np.random.default_rng(0)
    for qtype in TRITON_TYPES:
        block_size, type_size = BLOCK_LAYOUT[qtype]
        n_blocks = 65536 // block_size * 4
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        with np.errstate(all="ignore"):
            expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(-1)
        got = dequantize_triton(torch.from_numpy(raw).cuda(), qtype, (n_blocks * block_size,)).cpu().numpy()
        nan = np.isnan(expected)
        same = np.array_equal(np.isnan(got), nan) and np.array_equal(
            expected.view(np.uint32)[~nan], got.view(np.uint32)[~nan]
        )
        fail(checks, f"dequant {qtype} bit-identical to gguf", same, f"{n_blocks} random blocks")


def check_kquant_encoder(checks: list) -> None:
    from dit_quant.quant.gguf_kquants import KQUANT_TYPE_SIZES, quantize_kquant

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 1024, generator=g)
    for qtype in KQUANT_TYPE_SIZES:
        same = torch.equal(quantize_kquant(rows, qtype), quantize_kquant(rows.cuda(), qtype).cpu())
        fail(checks, f"K-quant encoder {qtype}: GPU bytes == CPU bytes", same, "64 x 1024 Gaussian")


def check_fused(checks: list) -> None:
    from dit_quant.kernels import quantize_rows
    from dit_quant.kernels.gguf_dequant_reference import dequantize_reference
    from dit_quant.kernels.gguf_matmul_triton import FUSED_TYPES, gguf_linear_fused, gguf_linear_int8_q8_0

    g = torch.Generator(device="cuda").manual_seed(2)
    n, k = 576, 3072
    weight = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    for qtype in FUSED_TYPES:
        raw = quantize_weight(weight, qtype)
        w_bf16 = dequantize_reference(raw, qtype, (n, k)).bfloat16()
        for m in (1, 77, 1000, 4608):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            ref = x.double() @ w_bf16.double().T + bias.double()
            out = gguf_linear_fused(x, raw, qtype, n, k, bias)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            fail(checks, f"fused {qtype} M={m}", err < 4e-3, f"relative L2 error {err:.2e} (bound 4e-3)")
    raw = quantize_weight(weight, "Q8_0")
    for m in (1, 77, 1000):
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        xq, xs = quantize_rows(x)
        out = gguf_linear_int8_q8_0(xq, xs, raw, n, k, bias, torch.float32)
        blocks = raw.view(n, k // 32, 34)
        qs = blocks[:, :, 2:].contiguous().view(torch.int8).double()
        d = blocks[:, :, :2].contiguous().view(torch.float16).double().squeeze(-1)
        part = torch.einsum("mbk,nbk->mnb", xq.double().view(m, k // 32, 32), qs)
        ref = (part * d[None]).sum(-1) * xs.double()[:, None] + bias.double()
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        fail(checks, f"int8 Q8_0 M={m}", err < 1e-5, f"max error / max |ref| {err:.2e} (bound 1e-5)")


# ----------------------------------------------------------------------------- 2. per-layer GEMMs


def layer_paths(x: torch.Tensor, weight_bf16: torch.Tensor, raws: dict, bias: torch.Tensor) -> dict:
    from dit_quant.kernels.gguf_dispatch import gguf_linear

    n, k = weight_bf16.shape
    paths = {"bf16 F.linear": lambda: F.linear(x, weight_bf16, bias)}
    for qtype, raw in raws.items():
        for mode, label in (
            ("torch", "torch dequant+linear"),
            ("dequant", "triton dequant+linear"),
            ("fused", "fused"),
            ("auto", "auto"),
        ):
            paths[f"{qtype} {label}"] = lambda raw=raw, qtype=qtype, mode=mode: gguf_linear(
                x, raw, qtype, (n, k), bias, mode
            )
    paths["Q8_0 int8"] = lambda: gguf_linear(x, raws["Q8_0"], "Q8_0", (n, k), bias, "int8")
    return paths


def timed(fn) -> float | str:
    """Median ms of fn, or the error it raised (one failing path does not end the run)."""
    try:
        return time_ms(fn)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:160]}"


def bench_layers(results: dict) -> None:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(3)
    for k, n in FLUX_SHAPES:
        weight = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
        weight_bf16 = weight.bfloat16()
        raws = {q: quantize_weight(weight, q) for q in QUANT_TYPES}
        bias = torch.randn(n, device="cuda", generator=g).bfloat16()
        for m in (4608, 512, 16, 1):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            times = {name: timed(fn) for name, fn in layer_paths(x, weight_bf16, raws, bias).items()}
            base = times["bf16 F.linear"]
            ratios = {p: t / base for p, t in times.items() if isinstance(t, float)}
            results.setdefault("layers", []).append(
                {"m": m, "k": k, "n": n, "ms": times, "ratio_to_bf16": ratios}
            )
            rows.append(
                [f"{m}x{k}->{n}", f"{base:.3f}"]
                + [f"{ratios[p]:.2f}" if p in ratios else "error" for p in times if p != "bf16 F.linear"]
            )
            print(f"  {rows[-1]}", flush=True)
        del weight, weight_bf16, raws
    headers = ["M x K -> N", "bf16 ms"] + [p for p in results["layers"][0]["ms"] if p != "bf16 F.linear"]
    results["layers_table"] = markdown_table(headers, rows)


def bench_dequant_bandwidth(results: dict) -> None:
    """Triton dequantization to bf16 of a 12288 x 3072 weight per type: ms and GB/s (bytes read + written)."""
    from dit_quant.kernels.gguf_dequant_reference import BLOCK_LAYOUT
    from dit_quant.kernels.gguf_dequant_triton import TRITON_TYPES, dequantize_triton

    n, k = 12288, 3072
    rng = np.random.default_rng(7)
    rows = []
    for qtype in TRITON_TYPES:
        block_size, type_size = BLOCK_LAYOUT[qtype]
        raw = torch.from_numpy(rng.integers(0, 256, size=(n * k // block_size, type_size), dtype=np.uint8))
        raw = raw.cuda()  # random bytes: the kernels' speed does not depend on the values
        ms = time_ms(lambda raw=raw, qtype=qtype: dequantize_triton(raw, qtype, (n, k), torch.bfloat16))
        gbps = (raw.numel() + n * k * 2) / ms / 1e6
        results.setdefault("dequant_bandwidth", {})[qtype] = {"ms": ms, "GBps": gbps}
        rows.append([qtype, f"{ms * 1e3:.1f}", f"{gbps:.0f}"])
        print(f"  dequant {qtype}: {ms * 1e3:.1f} us, {gbps:.0f} GB/s", flush=True)
    results["dequant_table"] = markdown_table(["type", "µs (12288x3072 -> bf16)", "GB/s"], rows)


def sweep_configs(results: dict) -> None:
    from dit_quant.kernels.gguf_matmul_triton import CANDIDATES, default_config, gguf_linear_fused

    k, n = SWEEP_SHAPE
    m = 4608
    g = torch.Generator(device="cuda").manual_seed(4)
    weight = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    weight_bf16 = weight.bfloat16()  # cast outside the timed call, as in bench_layers
    base = time_ms(lambda: F.linear(x, weight_bf16))
    sweep = {
        "m": m,
        "k": k,
        "n": n,
        "bf16_ms": base,
        "default": str(default_config(m, torch.cuda.get_device_capability())),
        "qtypes": {},
    }
    for qtype in QUANT_TYPES:
        raw = quantize_weight(weight, qtype)
        timings = {}
        for config in CANDIDATES:  # a tile that does not fit this GPU records its error
            timings[str(config)] = timed(
                lambda config=config, raw=raw, qtype=qtype: gguf_linear_fused(
                    x, raw, qtype, n, k, None, config
                )
            )
        valid = {c: t for c, t in timings.items() if isinstance(t, float)}
        best = min(valid, key=valid.get)
        sweep["qtypes"][qtype] = {"ms": timings, "best": best, "best_ratio_to_bf16": valid[best] / base}
        print(
            f"  sweep {qtype}: best {best} {valid[best]:.3f} ms = {valid[best] / base:.2f}x bf16", flush=True
        )
    results["sweep"] = sweep


# ----------------------------------------------------------------------------- 3. full Flux step


def quantize_flux(model: torch.nn.Module, gguf_ops, qtype: str, device: str = "cuda") -> None:
    """Give every quantizable Linear GGUF bytes (the writer's rules: embedders and final layer stay bf16,
    biases F32). Bytes are made once per distinct shape from random weights and copied to same-shape layers:
    kernel speed does not depend on the values."""
    from dit_quant.quant.gguf_type_rules import plan_tensor

    cache: dict[tuple[int, int], torch.Tensor] = {}
    g = torch.Generator(device=device).manual_seed(5)
    for name, module in model.named_modules():
        if not isinstance(module, gguf_ops.GGUFOps.Linear):
            continue
        shape = (module.out_features, module.in_features)
        plan = plan_tensor(f"{name}.weight", torch.Size(shape), torch.bfloat16, qtype, layer_weight=True)
        if plan.qtype == qtype:
            if shape not in cache:
                cache[shape] = quantize_weight(
                    torch.randn(shape, device=device, generator=g) * shape[1] ** -0.5, qtype
                )
            module.weight = torch.nn.Parameter(cache[shape].clone(), requires_grad=False)
            module.gguf_qtype, module.gguf_shape = qtype, torch.Size(shape)
        else:
            w = torch.randn(shape, device=device, generator=g) * shape[1] ** -0.5
            module.weight = torch.nn.Parameter(w.bfloat16(), requires_grad=False)
        if module.expects_bias:
            module.bias = torch.nn.Parameter(
                0.02 * torch.randn(shape[0], device=device, generator=g), requires_grad=False
            )


def bench_step(results: dict, steps: int) -> None:
    comfy_ops = import_comfy_module("comfy.ops")
    gguf_ops = import_comfy_module("dit_quant.nodes.gguf_ops")
    g = torch.Generator(device="cuda").manual_seed(6)
    inputs = flux_inputs(g)
    step = {}
    model = build_flux(comfy_ops.disable_weight_init, g)
    bf16_bytes = tensor_bytes(model)
    bf16_ms, bf16_out = time_step(model, inputs, steps)
    step["bf16"] = {"ms": bf16_ms, "weight_bytes": bf16_bytes}
    print(f"  bf16: {bf16_ms:.1f} ms, {bf16_bytes / 2**30:.2f} GiB of weights", flush=True)

    def entry(ms: float, weight_bytes: int) -> dict:
        return {
            "ms": ms,
            "ratio_to_bf16": ms / bf16_ms,
            "weight_bytes": weight_bytes,
            "bytes_ratio_to_bf16": weight_bytes / bf16_bytes,
        }

    with fused_blocks(model):
        fused_ms, _ = time_step(model, inputs, steps)
    step["bf16 + fused blocks"] = entry(fused_ms, bf16_bytes)
    print(f"  bf16 + fused blocks: {fused_ms:.1f} ms", flush=True)
    with fused_blocks(model), cuda_graphed(model):
        graphed_ms, _ = time_step(model, inputs, steps)
    step["bf16 + fused blocks + CUDA graph"] = entry(graphed_ms, bf16_bytes)
    print(f"  bf16 + fused blocks + CUDA graph: {graphed_ms:.1f} ms", flush=True)
    del model
    release()

    for qtype in QUANT_TYPES:
        model = build_flux(gguf_ops.GGUFOps, g)
        quantize_flux(model, gguf_ops, qtype)
        weight_bytes = tensor_bytes(model)
        outputs = {}
        for mode in ("torch", "dequant", "fused", "auto") + (("int8",) if qtype == "Q8_0" else ()):
            for layer in gguf_ops.gguf_layers(model).values():
                layer.gguf_mode = mode
            ms, outputs[mode] = time_step(model, inputs, steps)
            step[f"{qtype} {mode}"] = entry(ms, weight_bytes)
            print(
                f"  {qtype} {mode}: {ms:.1f} ms = {ms / bf16_ms:.3f}x bf16, weights "
                f"{weight_bytes / bf16_bytes:.3f}x",
                flush=True,
            )
        for layer in gguf_ops.gguf_layers(model).values():
            layer.gguf_mode = "auto"
        for variant, graphs in (("auto + fused blocks", False), ("auto + fused blocks + CUDA graph", True)):
            with fused_blocks(model), cuda_graphed(model) if graphs else contextlib.nullcontext():
                ms, outputs[variant] = time_step(model, inputs, steps)
            base_ms = graphed_ms if graphs else fused_ms
            step[f"{qtype} {variant}"] = {**entry(ms, weight_bytes),
                                          "ratio_to_bf16_fused_blocks": ms / base_ms}
            print(f"  {qtype} {variant}: {ms:.1f} ms = {ms / bf16_ms:.3f}x bf16, {ms / base_ms:.3f}x bf16 + "
                  f"fused blocks{' + CUDA graph' if graphs else ''}", flush=True)
        reference = outputs["torch"].double()
        for mode, out in outputs.items():
            err = ((out.double() - reference).norm() / reference.norm()).item()
            step[f"{qtype} {mode}"]["rel_err_vs_torch_dequant"] = err
            step[f"{qtype} {mode}"]["finite"] = bool(torch.isfinite(out).all())
        del model, outputs
        release()
    targets = {"Q8_0": (1.05, 0.55), "Q4_K": (1.05, 0.32)}
    for qtype, (time_bound, bytes_bound) in targets.items():
        for variant in (f"{qtype} auto", f"{qtype} auto + fused blocks",
                        f"{qtype} auto + fused blocks + CUDA graph"):
            record = step[variant]
            record["meets_target"] = (
                record["ratio_to_bf16"] <= time_bound and record["bytes_ratio_to_bf16"] <= bytes_bound
            )
    results["step"] = step
    del bf16_out


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep of the fused kernel")
    parser.add_argument("--steps", type=int, default=5, help="timed denoising steps per variant (median)")
    args = parser.parse_args()
    require_cuda("bench_gguf")
    try:
        import gguf  # noqa: F401
    except ImportError:
        print(
            "bench_gguf needs the gguf package (pure Python: copy .venv/.../site-packages/gguf onto "
            "PYTHONPATH)",
            file=sys.stderr,
        )
        return 2
    import_kernels()
    results: dict = {"environment": environment(), "checks": []}
    status = 0
    start = time.time()
    print("1. checks", flush=True)
    for check in (check_dequant, check_kquant_encoder, check_fused):
        try:
            check(results["checks"])
        except Exception:
            fail(results["checks"], check.__name__, False, traceback.format_exc(limit=3))
    if not all(c["ok"] for c in results["checks"]):
        status = 1
    else:
        sections = [
            ("2. per-layer GEMMs", bench_layers),
            ("2a. dequantization bandwidth", bench_dequant_bandwidth),
        ]
        if not args.no_sweep:
            sections.append(("2b. tile sweep", sweep_configs))
        sections.append(("3. Flux denoising step", lambda r: bench_step(r, args.steps)))
        for title, section in sections:
            print(title, flush=True)
            try:
                section(results)
            except Exception:
                results.setdefault("errors", {})[title] = traceback.format_exc()
                print(results["errors"][title], file=sys.stderr, flush=True)
                status = 1
    results["seconds"] = time.time() - start
    save_results("bench_gguf", results, render_markdown(results), args.out)
    return status


def render_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# GGUF benchmark ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date_utc']})",
        "",
        f"Command: `{env['command']}`",
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {'ok' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}" for c in results["checks"]]
    if "step" in results:
        rows = [
            [
                name,
                f"{e['ms']:.1f}",
                f"{e.get('ratio_to_bf16', 1.0):.3f}",
                f"{e['ratio_to_bf16_fused_blocks']:.3f}" if "ratio_to_bf16_fused_blocks" in e else "",
                f"{e.get('bytes_ratio_to_bf16', 1.0):.3f}",
                f"{e.get('rel_err_vs_torch_dequant', 0.0):.1e}",
                {True: "yes", False: "NO"}.get(e.get("meets_target"), ""),
            ]
            for name, e in results["step"].items()
        ]
        lines += [
            "",
            "## Flux-dev denoising step, 1024x1024 (4096 image + 512 text tokens), bf16 activations",
            "",
            markdown_table(
                [
                    "variant",
                    "ms",
                    "time / bf16",
                    "time / (bf16 + fused blocks [+ CUDA graph])",
                    "weight bytes / bf16",
                    "rel. err vs torch dequant",
                    "meets target",
                ],
                rows,
            ),
        ]
    if "dequant_table" in results:
        lines += ["", "## Triton dequantization to bf16", "", results["dequant_table"]]
    if "layers_table" in results:
        lines += ["", "## Per-layer GEMMs: time relative to bf16 F.linear", "", results["layers_table"]]
    if "sweep" in results:
        sweep = results["sweep"]
        lines += [
            "",
            f"## Tile sweep, M={sweep['m']} K={sweep['k']} N={sweep['n']} (default {sweep['default']})",
            "",
        ]
        for qtype, entry in sweep["qtypes"].items():
            lines.append(f"- {qtype}: best {entry['best']} = {entry['best_ratio_to_bf16']:.2f}x bf16")
    for title, error in results.get("errors", {}).items():
        lines += ["", f"## Error in {title}", "", "```", error, "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
