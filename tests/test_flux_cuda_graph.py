"""CUDA-graph replay of ComfyUI's Flux transformer (kernels/cuda_graphs.py, nodes/flux_cuda_graph.py) and
the "Flux CUDA Graphs" node.

On CPU: the node's ComfyUI wiring (object patch, unload callback, KSampler output bit-identical with the
eager fallback it takes on CPU) and every rule that sends a call down the eager path. On the GPU (marked
``gpu``): replays against eager runs of the same model (stock bf16, fused bf16, fused INT8), new inputs
of the same shape, a new shape, eviction, a replaced parameter (recapture) and an in-place weight update
(read by the replay). A replay runs the kernels the eager pass ran, so outputs are compared bit for bit.
The GPU tests build the model without the full ComfyUI (the lent GPU machine lacks its sampler's
dependencies), from ComfyUI's own Flux class.
"""

import logging
import sys

import pytest
import torch
from comfy_harness import TinyModelSpec, build_tiny_model, comfy_root, tiny_flux_patcher

SPEC = TinyModelSpec(family="flux", depth=2, width=256)
GRAPH_LOG = "without a CUDA graph"


def _ksampler_latent(comfy, model) -> torch.Tensor:
    def conditioning(seed):
        (cond,) = comfy.run_node("DiTQuantTestConditioning", seed=seed, tokens=SPEC.context_tokens,
                                 context_dim=SPEC.context_dim, pooled_dim=SPEC.pooled_dim)
        return cond

    (latent,) = comfy.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    (out,) = comfy.run_node("KSampler", model=model, seed=5, steps=2, cfg=3.0, sampler_name="euler",
                            scheduler="simple", positive=conditioning(11), negative=conditioning(12),
                            latent_image=latent, denoise=1.0)
    return out["samples"].detach().clone()


@pytest.fixture(scope="module")
def flux_patcher(comfy):
    return tiny_flux_patcher(build_tiny_model(SPEC, seed=1).state_dict())


def test_node_registered(comfy):
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["FluxCudaGraphs"] == "Flux CUDA Graphs"
    required = comfy.nodes.NODE_CLASS_MAPPINGS["FluxCudaGraphs"].INPUT_TYPES()["required"]
    assert required["model"][0] == "MODEL" and required["enabled"][0] == "BOOLEAN"
    assert required["max_graphs"][0] == "INT" and required["max_graphs"][1]["min"] == 1


def test_node_patches_forward_orig_and_releases_on_unload(comfy, flux_patcher):
    from comfy.patcher_extension import CallbacksMP

    flux_cuda_graph = comfy.module("nodes.flux_cuda_graph")
    (patched,) = comfy.run_node("FluxCudaGraphs", model=flux_patcher, enabled=True, max_graphs=3)
    assert patched is not flux_patcher and "diffusion_model.forward_orig" not in flux_patcher.object_patches
    graphed = patched.object_patches["diffusion_model.forward_orig"]
    assert isinstance(graphed, flux_cuda_graph.FluxCudaGraph) and graphed.graphs.max_graphs == 3
    detach = patched.get_all_callbacks(CallbacksMP.ON_DETACH)
    assert graphed.release in detach
    (same,) = comfy.run_node("FluxCudaGraphs", model=flux_patcher, enabled=False, max_graphs=2)
    assert same is flux_patcher


def test_node_in_ksampler_on_cpu_runs_eagerly(comfy, flux_patcher, caplog):
    """On CPU every call takes the eager path: the latent equals the stock one bit for bit, and the
    reason is logged."""
    plain = _ksampler_latent(comfy, flux_patcher)
    (graphed_model,) = comfy.run_node("FluxCudaGraphs", model=flux_patcher, enabled=True, max_graphs=2)
    (fused_model,) = comfy.run_node("FuseFluxBlocks", model=graphed_model, enabled=True)
    with caplog.at_level(logging.INFO, logger="dit_quant.nodes"):
        graphed = _ksampler_latent(comfy, graphed_model)
        fused_graphed = _ksampler_latent(comfy, fused_model)
    (fused_only,) = comfy.run_node("FuseFluxBlocks", model=flux_patcher, enabled=True)
    assert torch.equal(graphed, plain)
    assert torch.equal(fused_graphed, _ksampler_latent(comfy, fused_only))
    assert not torch.equal(fused_graphed, plain)  # the fused blocks ran under the graph node's forward_orig
    runner = graphed_model.object_patches["diffusion_model.forward_orig"]
    assert runner.graphs.captures == 0 and len(runner.graphs) == 0
    # Logged once per process: this test may not be the first to take the CPU path.
    logged = [r.message for r in caplog.records if GRAPH_LOG in r.message]
    assert not logged or "not on a CUDA GPU" in logged[0]


def test_options_that_change_the_pass_block_graphs(comfy):
    rules = comfy.module("nodes.flux_cuda_graph").options_block_graphs
    plain = {"sigmas": torch.tensor([0.5]), "cond_or_uncond": [0, 1], "patches": {}, "patches_replace": {}}
    assert rules(None, plain) is None
    assert rules({"input": [torch.zeros(1)]}, plain) == "ControlNet inputs"
    assert rules(None, {**plain, "patches_replace": {"dit": {("double_block", 0): print}}}) == \
        "block replacement patches"
    assert rules(None, {**plain, "patches": {"post_input": [print]}}) == "model patches"
    assert rules(None, {**plain, "optimized_attention_override": print}) == "an attention override"


def test_weights_guard_tracks_storage_and_blocks_offload(comfy):
    flux_cuda_graph = comfy.module("nodes.flux_cuda_graph")
    lora_branch = comfy.module("quant.lora_branch")
    model = build_tiny_model(SPEC, seed=2)
    weights_guard = flux_cuda_graph.WeightsGuard(model)
    cpu = torch.device("cpu")
    why, guard = weights_guard(cpu)
    assert why is None and len(guard) == sum(1 for _ in model.parameters())
    assert weights_guard(cpu) == (None, guard)
    layer = model.double_blocks[0].img_attn.qkv
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: same storage, the replay reads the new values
    assert weights_guard(cpu) == (None, guard)
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())  # new storage: recapture
    why, moved = weights_guard(cpu)
    assert why is None and moved != guard
    why, _ = weights_guard(torch.device("cuda", 0))
    assert why is not None and "low-VRAM offloading" in why

    int8 = build_tiny_model(SPEC, seed=2)
    quantizer = comfy.module("quant.model_quantizer")
    names, _kept = quantizer.plan_quantization(int8)
    int8 = quantizer.quantized_copy(int8, names, comfy.module("nodes.comfy_int8_ops").make_int8_layer)
    int8_guard = flux_cuda_graph.WeightsGuard(int8)
    _, plain = int8_guard(cpu)
    linear2 = int8.single_blocks[0].linear2
    term = lora_branch.LowRankTerm(down=torch.randn(4, linear2.in_features),
                                   up=torch.randn(linear2.out_features, 4), scale=0.5)
    linear2.lora_branch = lora_branch.LowRankBranch([term], linear2.out_features, linear2.in_features)
    why, with_lora = int8_guard(cpu)
    assert why is None and len(with_lora) == len(plain) + 2  # the branch's down and up are guarded
    layer.weight_function = [lambda w: w]
    why, _ = weights_guard(cpu)
    assert why is not None and "per call" in why


def test_graph_cache_arguments(comfy):
    cuda_graphs = comfy.module("kernels.cuda_graphs")
    with pytest.raises(ValueError, match="max_graphs"):
        cuda_graphs.CudaGraphCache("x", max_graphs=0)
    assert cuda_graphs.not_capturable([torch.ones(2), None]) == "the inputs are not on a CUDA GPU"
    assert cuda_graphs.not_capturable([None]) == "the inputs are not on a CUDA GPU"
    cache = cuda_graphs.CudaGraphCache("x")
    assert len(cache) == 0 and cache.captures == 0


# ---- GPU: the graphs themselves ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_modules():
    """The pack's node modules imported without the full ComfyUI (only ``comfy.*`` model code)."""
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from _pack import import_node_module

    return {name: import_node_module(name) for name in ("flux_cuda_graph", "fused_flux", "comfy_int8_ops")}


def _cuda_flux(seed: int = 3) -> torch.nn.Module:
    return build_tiny_model(SPEC, seed=seed).cuda().eval()


def _inputs(seed: int, size: int = 8) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "x": torch.randn(1, SPEC.in_channels, size, size, device="cuda", generator=g).bfloat16(),
        "timestep": torch.rand(1, device="cuda", generator=g),
        "context": torch.randn(1, SPEC.context_tokens, SPEC.context_dim, device="cuda",
                               generator=g).bfloat16(),
        "y": torch.randn(1, SPEC.pooled_dim, device="cuda", generator=g).bfloat16(),
    }


def _variant(gpu_modules, kind: str) -> torch.nn.Module:
    """The tiny Flux on the GPU: stock bf16, bf16 with fused blocks, or INT8 (Triton) with fused blocks."""
    model = _cuda_flux()
    if kind == "int8 fused":
        import dit_quant.quant.model_quantizer as quantizer

        names, _kept = quantizer.plan_quantization(model)
        model = quantizer.quantized_copy(model, names, gpu_modules["comfy_int8_ops"].make_int8_layer).eval()
    if kind != "bf16":
        for path, forward in gpu_modules["fused_flux"].fused_block_forwards(model).items():
            model.get_submodule(path.removesuffix(".forward")).forward = forward
    return model


def _run(model, inputs: dict, graphed=None) -> torch.Tensor:
    """One call of the model, with ``graphed`` installed as its forward_orig when given."""
    if graphed is not None:
        model.forward_orig = graphed
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        if graphed is not None:
            del model.forward_orig


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "bf16 fused", "int8 fused"])
def test_replay_equals_eager_gpu(gpu_modules, kind):
    model = _variant(gpu_modules, kind)
    inputs = [_inputs(seed) for seed in (10, 11, 12)]
    eager = [_run(model, i) for i in inputs]
    graphed = gpu_modules["flux_cuda_graph"].FluxCudaGraph(model)
    outs = [_run(model, i, graphed) for i in (*inputs, inputs[0])]
    assert graphed.graphs.captures == 1 and graphed.graphs.replays == 3
    for out, want in zip(outs, [*eager, eager[0]], strict=True):
        assert torch.isfinite(out).all()
        assert torch.equal(out, want)
    assert not torch.equal(outs[1], outs[2])  # each replay computed its own inputs
    graphed.release()
    assert len(graphed.graphs) == 0


@pytest.mark.gpu
def test_new_shapes_eviction_and_weight_changes_gpu(gpu_modules):
    model = _variant(gpu_modules, "int8 fused")
    graphed = gpu_modules["flux_cuda_graph"].FluxCudaGraph(model, max_graphs=1)
    small, large = _inputs(20, size=8), _inputs(21, size=16)
    for inputs in (small, small, large, large):
        assert torch.equal(_run(model, inputs, graphed), _run(model, inputs))
    assert graphed.graphs.captures == 2 and graphed.graphs.replays == 2 and len(graphed.graphs) == 1

    layer = model.single_blocks[0].linear2  # INT8: weight_scale scales its output channels
    with torch.no_grad():
        layer.weight_scale.mul_(1.5)  # in place: the replay reads it
    replayed = _run(model, large, graphed)
    assert graphed.graphs.captures == 2 and graphed.graphs.replays == 3
    assert torch.equal(replayed, _run(model, large))
    bias = model.final_layer.linear.bias.detach() + 0.25
    model.final_layer.linear.bias = torch.nn.Parameter(bias, requires_grad=False)  # new storage
    recaptured = _run(model, large, graphed)
    assert graphed.graphs.captures == 3
    assert torch.equal(recaptured, _run(model, large))
    assert not torch.equal(recaptured, replayed)


@pytest.mark.gpu
def test_patched_options_run_eagerly_gpu(gpu_modules):
    model = _variant(gpu_modules, "bf16 fused")
    graphed = gpu_modules["flux_cuda_graph"].FluxCudaGraph(model)
    seen = []

    def replace(args, extra):
        seen.append(args["img"].shape)
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("single_block", 0): replace}}}
    inputs = {**_inputs(30), "transformer_options": options}
    for _ in range(2):
        assert torch.equal(_run(model, inputs, graphed), _run(model, inputs))
    assert graphed.graphs.captures == 0 and len(seen) == 4  # the patch ran on every call
