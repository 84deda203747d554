"""End-to-end W8A8 on a full-size Flux model: one denoising step and a 4-step sample at 1024x1024, batch 1.

Variants, built one after another from ComfyUI's own Flux class with random weights (matrices std 0.02):
- bf16: ComfyUI's default operations;
- int8 (ours): every Linear the pack's layer rules quantize (embedders and the final layer stay bf16)
  replaced by the ComfyUI INT8 layer the loader builds, Triton kernels, no torch.compile;
- fp8_e4m3fn_fast (GPUs with FP8, sm_89+): ComfyUI's ``fp8_ops`` (what the weight dtype
  "fp8_e4m3fn_fast" selects) with every Linear weight cast to float8_e4m3fn;
- bf16 / int8 + torch.compile (``--compile``): each model compiled whole; first-call time and steady state;
- bf16 / int8 + fused blocks (``--fused``): every Flux block runs the pack's fused forward (what the
  "Fused Flux Blocks" node switches on; nodes/fused_flux.py), eager, no torch.compile;
- + CUDA graph (``--graphs``): bf16, bf16 + fused blocks and int8 + fused blocks with the model's forward
  pass replayed from a CUDA graph (what the "DiT CUDA Graphs" node switches on; nodes/model_cuda_graph.py),
  no torch.compile; each checked bit-identical to the same variant run eagerly.
For each: median step time, 4-step sample time, resident weight bytes (parameters + buffers), peak VRAM
during a step, and the relative L2 error of the step output against bf16's.

    python bench/bench_flux_step.py [--out DIR] [--steps 5] [--compile] [--fused] [--graphs] [--profile]
                                    [--inference-mode]

Needs ComfyUI (COMFYUI_PATH or .cache/ComfyUI). Writes bench_flux_step.{json,md} to bench/results/ and --out.
"""

from __future__ import annotations

import sys
import time
import traceback

import numpy as np
import torch
from flux_common import (
    build_flux,
    cuda_graphed,
    flux_inputs,
    fused_blocks,
    import_comfy_module,
    inference_context,
    release,
    tensor_bytes,
    time_step,
    use_inference_mode,
)
from w8a8_common import arg_parser, environment, import_kernels, markdown_table, require_cuda, save_results

WEIGHT_STD = 0.02
SAMPLE_STEPS = 4


def time_sample(model, inputs: dict, repeats: int = 3) -> float:
    """Median ms of a 4-step Euler sample (sigmas 1 -> 0) over ``repeats`` runs."""
    sigmas = torch.linspace(1.0, 0.0, SAMPLE_STEPS + 1).tolist()
    times = []
    with inference_context():
        for _ in range(repeats):
            x = inputs["x"].clone()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
                t = torch.full_like(inputs["timestep"], s)
                x = x + (s_next - s) * model(**{**inputs, "x": x, "timestep": t})
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return float(np.median(times))


def peak_step_bytes(model, inputs: dict) -> int:
    """Peak bytes allocated on the GPU during one step (resident weights included)."""
    release()
    torch.cuda.reset_peak_memory_stats()
    with inference_context():
        model(**inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def host_submit_ms(model, inputs: dict, repeats: int = 3) -> float:
    """Median wall ms the host spends issuing one step (before waiting for the GPU): when it is close to
    the step time, the step is bound by Python and kernel launches, not by the GPU."""
    times = []
    with inference_context():
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize()
    return float(np.median(times))


def kernel_profile(model, inputs: dict, top: int = 15) -> dict:
    """GPU kernel time of one step from torch.profiler: the sum over all kernels and the ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    with inference_context(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        torch.cuda.synchronize()
    rows = [
        {"kernel": e.key[:90], "calls": e.count, "ms": e.device_time_total / 1e3}
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    rows.sort(key=lambda r: -r["ms"])
    return {"kernel_ms_total": sum(r["ms"] for r in rows), "top": rows[:top]}


def measure(
    name: str, model, inputs: dict, steps: int, reference: torch.Tensor | None, step: dict, profile: bool
) -> torch.Tensor:
    ms, out = time_step(model, inputs, steps)
    entry = {
        "step_ms": ms,
        "host_submit_ms": host_submit_ms(model, inputs),
        "sample_4_steps_ms": time_sample(model, inputs),
        "weight_bytes": tensor_bytes(model),
        "peak_vram_bytes": peak_step_bytes(model, inputs),
        "finite": bool(torch.isfinite(out).all()),
    }
    if reference is not None:
        ref = reference.double()
        entry["rel_err_vs_bf16"] = ((out.double() - ref).norm() / ref.norm()).item()
    if profile:
        entry["profile"] = kernel_profile(model, inputs)
    base = step.get("bf16")
    if base is not None:
        entry["speedup_vs_bf16"] = base["step_ms"] / ms
        entry["sample_speedup_vs_bf16"] = base["sample_4_steps_ms"] / entry["sample_4_steps_ms"]
        entry["weight_bytes_ratio"] = entry["weight_bytes"] / base["weight_bytes"]
        entry["peak_vram_ratio"] = entry["peak_vram_bytes"] / base["peak_vram_bytes"]
    step[name] = entry
    print(
        f"  {name}: "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "profile"
        ),
        flush=True,
    )
    return out


def int8_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with each Linear the default layer rules select replaced by the pack's INT8 layer."""
    from dit_quant.quant.model_quantizer import plan_quantization, quantized_copy

    int8_ops = import_comfy_module("dit_quant.nodes.comfy_int8_ops")
    names, _kept = plan_quantization(model)
    return quantized_copy(model, names, make_layer=int8_ops.make_int8_layer)


def fp8_model(generator: torch.Generator) -> torch.nn.Module:
    """Flux with ComfyUI's fp8_ops and float8_e4m3fn Linear weights (what "fp8_e4m3fn_fast" loads)."""
    comfy_ops = import_comfy_module("comfy.ops")
    model = build_flux(comfy_ops.fp8_ops, generator, WEIGHT_STD)
    for module in model.modules():
        if isinstance(module, comfy_ops.fp8_ops.Linear):
            module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
    return model


def measure_compiled(
    name: str, model, inputs: dict, steps: int, reference, step: dict, profile: bool, results: dict
) -> None:
    """``measure`` of ``torch.compile(model)``; the first call's wall time (compilation) is recorded too."""
    compiled = torch.compile(model)
    start = time.time()
    with inference_context():
        compiled(**inputs)
    torch.cuda.synchronize()
    results.setdefault("compile_first_call_s", {})[name] = time.time() - start
    measure(name, compiled, inputs, steps, reference, step, profile)


def measure_graphed(
    name: str, model, inputs: dict, steps: int, reference, step: dict, profile: bool, eager_out: torch.Tensor
) -> None:
    """``measure`` with the forward pass replayed from a CUDA graph; records how many graphs were
    captured and replayed, the first call's wall time (eager pass + capture), and how far the output is
    from the eager run of the same variant (the same kernels run, so it is expected to be equal bit for
    bit)."""
    with cuda_graphed(model) as graphed:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with inference_context():
            model(**inputs)  # the first call at this shape: an eager pass, then the capture
        torch.cuda.synchronize()
        first_call_ms = (time.perf_counter() - start) * 1e3
        out = measure(name, model, inputs, steps, reference, step, profile)
        diff = (out.double() - eager_out.double()).norm() / eager_out.double().norm()
        step[name].update(first_call_ms=first_call_ms, graph_captures=graphed.graphs.captures,
                          graph_replays=graphed.graphs.replays, rel_err_vs_eager=diff.item(),
                          equals_eager=bool(torch.equal(out, eager_out)))
        if not (graphed.graphs.captures == 1 and graphed.graphs.replays > 0):
            raise RuntimeError(f"{name}: expected 1 capture and replays, got {step[name]}")


def run(
    results: dict, steps: int, compile_models: bool, profile: bool, fused: bool, graphs: bool
) -> None:
    comfy_ops = import_comfy_module("comfy.ops")
    g = torch.Generator(device="cuda").manual_seed(7)
    inputs = flux_inputs(g)
    step: dict = {}
    results["step"] = step

    model = build_flux(comfy_ops.disable_weight_init, g, WEIGHT_STD)
    reference = measure("bf16", model, inputs, steps, None, step, profile)
    if graphs:
        measure_graphed("bf16 + CUDA graph", model, inputs, steps, reference, step, profile, reference)
    if fused:
        with fused_blocks(model):
            out = measure("bf16 + fused blocks", model, inputs, steps, reference, step, profile)
            if graphs:
                measure_graphed("bf16 + fused blocks + CUDA graph", model, inputs, steps, reference, step,
                                profile, out)
    if compile_models:
        measure_compiled("bf16 + torch.compile", model, inputs, steps, reference, step, profile, results)
        torch._dynamo.reset()
    int8 = int8_copy(model)
    del model  # the int8 copy shares every tensor it did not quantize
    release()
    measure("int8 (ours)", int8, inputs, steps, reference, step, profile)
    if fused:
        with fused_blocks(int8):
            out = measure("int8 (ours) + fused blocks", int8, inputs, steps, reference, step, profile)
            if graphs:
                measure_graphed("int8 (ours) + fused blocks + CUDA graph", int8, inputs, steps, reference,
                                step, profile, out)
    if compile_models:
        measure_compiled(
            "int8 (ours) + torch.compile", int8, inputs, steps, reference, step, profile, results
        )
        torch._dynamo.reset()
    del int8
    release()
    if torch.cuda.get_device_capability() >= (8, 9):
        model = fp8_model(g)
        measure("fp8_e4m3fn_fast (ComfyUI)", model, inputs, steps, reference, step, profile)
        del model
        release()


def render_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# Flux-dev end to end, 1024x1024, batch 1 ({env['gpu']}, driver {env['driver']}, torch "
        f"{env['torch']}, triton {env['triton']}, {env['date_utc']})",
        "",
        f"Command: `{env['command']}`",
        "",
        "Random weights (std 0.02), 4096 image + 512 text tokens; median of CUDA-event timings.",
        "",
    ]
    rows = []
    for name, e in results.get("step", {}).items():
        rows.append(
            [
                name,
                f"{e['step_ms']:.1f}",
                f"{e['host_submit_ms']:.1f}",
                f"{e.get('speedup_vs_bf16', 1.0):.3f}",
                f"{e['sample_4_steps_ms']:.0f}",
                f"{e.get('sample_speedup_vs_bf16', 1.0):.3f}",
                f"{e['weight_bytes'] / 2**30:.2f}",
                f"{e.get('weight_bytes_ratio', 1.0):.3f}",
                f"{e['peak_vram_bytes'] / 2**30:.2f}",
                f"{e.get('rel_err_vs_bf16', 0.0):.2e}",
            ]
        )
    if rows:
        lines.append(
            markdown_table(
                [
                    "variant",
                    "step ms",
                    "host submit ms",
                    "speed-up",
                    "4-step ms",
                    "4-step speed-up",
                    "weights GiB",
                    "weights / bf16",
                    "peak VRAM GiB",
                    "rel. err vs bf16",
                ],
                rows,
            )
        )
    for name, e in results.get("step", {}).items():
        if "profile" in e:
            p = e["profile"]
            lines += [
                "",
                f"### GPU kernels of one step: {name} (sum {p['kernel_ms_total']:.1f} ms, "
                f"step {e['step_ms']:.1f} ms, host submit {e['host_submit_ms']:.1f} ms)",
                "",
            ]
            lines.append(
                markdown_table(
                    ["kernel", "calls", "ms"], [[r["kernel"], r["calls"], f"{r['ms']:.2f}"] for r in p["top"]]
                )
            )
    for name, e in results.get("step", {}).items():
        if "graph_captures" in e:
            lines += ["", f"{name}: first call (eager pass + capture) {e['first_call_ms']:.0f} ms; "
                          f"{e['graph_captures']} capture, {e['graph_replays']} replays; output "
                          f"vs the same variant eager: rel. err {e['rel_err_vs_eager']:.2e}, bit-identical "
                          f"{e['equals_eager']}"]
    for name, seconds in results.get("compile_first_call_s", {}).items():
        lines += ["", f"{name}: first call (compilation included) {seconds:.0f} s"]
    if "error" in results:
        lines += ["", "## Error", "", "```", results["error"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--steps", type=int, default=5, help="timed denoising steps per variant (median)")
    parser.add_argument("--compile", action="store_true", help="also time bf16 and int8 under torch.compile")
    parser.add_argument("--fused", action="store_true", help="also time bf16 and int8 with fused Flux blocks")
    parser.add_argument("--graphs", action="store_true",
                        help="also time bf16 and the fused variants replayed from CUDA graphs")
    parser.add_argument("--inference-mode", action="store_true",
                        help="run under torch.inference_mode, as ComfyUI samples (default: torch.no_grad)")
    parser.add_argument("--profile", action="store_true", help="record the top GPU kernels of each variant")
    args = parser.parse_args()
    require_cuda("bench_flux_step")
    import_kernels()
    if args.inference_mode:
        use_inference_mode()
    results: dict = {"environment": environment(), "autograd_mode": "inference_mode" if args.inference_mode
                     else "no_grad"}
    status = 0
    try:
        run(results, args.steps, args.compile, args.profile, args.fused, args.graphs)
    except Exception:
        results["error"] = traceback.format_exc()
        print(results["error"], file=sys.stderr, flush=True)
        status = 1
    save_results("bench_flux_step", results, render_markdown(results), args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
