"""CUDA-graph replay of a diffusion model's forward pass (kernels/cuda_graphs.py, nodes/model_cuda_graph.py)
and the "DiT CUDA Graphs" node.

On CPU: the node's ComfyUI wiring (object patch, unload callback, KSampler latents bit-identical with the
eager fallback it takes on CPU, for Flux and SD3) and every rule that sends a call down the eager path.
On the GPU (marked ``gpu``): replays against eager runs of the same model (Flux stock bf16, fused bf16,
fused INT8; SD3), Wan (which cannot be captured and runs eagerly), new inputs of the same shape, a new
shape, eviction, a replaced parameter (recapture) and an in-place weight update (read by the replay), a
capture that fails, a function that returns no tensor, and arguments that change every call. A replay
runs the kernels the eager pass ran, so outputs are compared bit for bit. The GPU tests build the models
without the full ComfyUI (the lent GPU machine lacks its sampler's dependencies), from ComfyUI's own
model classes.
"""

import logging
import sys

import pytest
import torch
from comfy_harness import (
    TinyModelSpec,
    build_tiny_model,
    comfy_root,
    ksampler_latent,
    save_tiny_model,
    tiny_flux_patcher,
)

FLUX = TinyModelSpec(family="flux", depth=2, width=256)
SD3 = TinyModelSpec(family="sd3", depth=2)
WAN = TinyModelSpec(family="wan", depth=2)
GRAPH_LOG = "without a CUDA graph"


@pytest.fixture(scope="module")
def flux_patcher(comfy):
    return tiny_flux_patcher(build_tiny_model(FLUX, seed=1).state_dict())


@pytest.fixture(scope="module")
def sd3_patcher(comfy):
    path = comfy.diffusion_models_dir / "graph_tiny_sd3.safetensors"
    if not path.exists():
        save_tiny_model(path, SD3, seed=0)
    (model,) = comfy.run_node("UNETLoader", unet_name=path.name, weight_dtype="default")
    return model


def test_node_registered(comfy):
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["DiTCudaGraphs"] == "DiT CUDA Graphs"
    required = comfy.nodes.NODE_CLASS_MAPPINGS["DiTCudaGraphs"].INPUT_TYPES()["required"]
    assert required["model"][0] == "MODEL" and required["enabled"][0] == "BOOLEAN"
    assert required["max_graphs"][0] == "INT" and required["max_graphs"][1]["min"] == 1


def test_node_patches_forward_and_releases_on_unload(comfy, flux_patcher):
    from comfy.patcher_extension import CallbacksMP

    model_cuda_graph = comfy.module("nodes.model_cuda_graph")
    (patched,) = comfy.run_node("DiTCudaGraphs", model=flux_patcher, enabled=True, max_graphs=3)
    assert patched is not flux_patcher and "diffusion_model.forward" not in flux_patcher.object_patches
    graphed = patched.object_patches["diffusion_model.forward"]
    assert isinstance(graphed, model_cuda_graph.ModelCudaGraph) and graphed.graphs.max_graphs == 3
    assert graphed.release in patched.get_all_callbacks(CallbacksMP.ON_DETACH)
    (same,) = comfy.run_node("DiTCudaGraphs", model=flux_patcher, enabled=False, max_graphs=2)
    assert same is flux_patcher


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_node_in_ksampler_on_cpu_runs_eagerly(comfy, flux_patcher, sd3_patcher, family, caplog, monkeypatch):
    """On CPU every call takes the eager path: the latent equals the stock one bit for bit, and the
    reason is logged (once per process, so only checked when this test logs it)."""
    source, spec = (flux_patcher, FLUX) if family == "flux" else (sd3_patcher, SD3)
    plain = ksampler_latent(comfy, source, spec, seed=5)
    (graphed_model,) = comfy.run_node("DiTCudaGraphs", model=source, enabled=True, max_graphs=2)
    monkeypatch.setattr(comfy.module("kernels.dispatch"), "_logged", set())  # this test sees its message
    with caplog.at_level(logging.INFO, logger="dit_quant.nodes"):
        graphed = ksampler_latent(comfy, graphed_model, spec, seed=5)
    assert torch.equal(graphed, plain)
    runner = graphed_model.object_patches["diffusion_model.forward"]
    assert runner.graphs.captures == 0 and len(runner.graphs) == 0
    logged = [r.message for r in caplog.records if GRAPH_LOG in r.message]
    assert len(logged) == 1 and logged[0].endswith("the inputs are not on a CUDA GPU"), logged


def test_node_keeps_an_earlier_forward_patch(comfy, sd3_patcher):
    """Another node's patched ``diffusion_model.forward`` is what the graph node runs (and replays)."""
    diffusion_model = sd3_patcher.model.diffusion_model
    calls = []

    def halved(*args, **kwargs):
        calls.append(1)
        return type(diffusion_model).forward(diffusion_model, *args, **kwargs) * 0.5

    patched = sd3_patcher.clone()
    patched.add_object_patch("diffusion_model.forward", halved)
    (graphed_model,) = comfy.run_node("DiTCudaGraphs", model=patched, enabled=True, max_graphs=2)
    (twice,) = comfy.run_node("DiTCudaGraphs", model=graphed_model, enabled=True, max_graphs=2)
    assert graphed_model.object_patches["diffusion_model.forward"].forward is halved
    assert twice.object_patches["diffusion_model.forward"].forward is halved  # not a graph of a graph
    want = ksampler_latent(comfy, patched, SD3, seed=6)
    got = ksampler_latent(comfy, twice, SD3, seed=6)
    assert torch.equal(got, want) and len(calls) > 0
    assert not torch.equal(got, ksampler_latent(comfy, sd3_patcher, SD3, seed=6))


def test_node_under_fused_flux_blocks_on_cpu(comfy, flux_patcher):
    (graphed_model,) = comfy.run_node("DiTCudaGraphs", model=flux_patcher, enabled=True, max_graphs=2)
    (fused_graphed,) = comfy.run_node("FuseFluxBlocks", model=graphed_model, enabled=True)
    (fused_only,) = comfy.run_node("FuseFluxBlocks", model=flux_patcher, enabled=True)
    both = ksampler_latent(comfy, fused_graphed, FLUX, seed=5)
    assert torch.equal(both, ksampler_latent(comfy, fused_only, FLUX, seed=5))
    assert not torch.equal(both, ksampler_latent(comfy, flux_patcher, FLUX, seed=5))  # fused blocks ran


def test_options_that_change_the_pass_block_graphs(comfy):
    rules = comfy.module("nodes.model_cuda_graph").options_block_graphs
    from comfy.patcher_extension import WrappersMP

    plain = {"sigmas": torch.tensor([0.5]), "cond_or_uncond": [0, 1], "patches": {}, "patches_replace": {},
             "wrappers": {WrappersMP.DIFFUSION_MODEL: {}, WrappersMP.APPLY_MODEL: {None: [print]}}}
    assert rules(None, plain) is None
    assert rules({"input": [torch.zeros(1)]}, plain) == "ControlNet inputs"
    assert rules(None, {**plain, "patches_replace": {"dit": {("double_block", 0): print}}}) == \
        "block replacement patches"
    assert rules(None, {**plain, "patches": {"post_input": [print]}}) == "model patches"
    assert rules(None, {**plain, "optimized_attention_override": print}) == "an attention override"
    wrapped = {**plain, "wrappers": {WrappersMP.DIFFUSION_MODEL: {None: [print]}}}
    assert rules(None, wrapped) == "diffusion-model wrappers"


def test_options_key_holds_the_constant_settings(comfy):
    options_key = comfy.module("nodes.model_cuda_graph").options_key
    base = {"sigmas": torch.tensor([0.7]), "sample_sigmas": torch.tensor([1.0, 0.0]), "cond_or_uncond": [0],
            "uuids": ["a"], "block_index": 3, "patches": {}, "wrappers": {}, "callbacks": {}}
    assert options_key(base) == (None, ())
    steps = [{**base, "sigmas": torch.tensor([s]), "cond_or_uncond": c}
             for s, c in ((0.5, [1, 0]), (0.2, [0]))]
    assert all(options_key(o) == (None, ()) for o in steps)  # per-call entries do not split graphs
    rope = {**base, "rope_options": {"scale_x": 1.5, "shift_t": 0}, "attn_precision": torch.float32}
    why, key = options_key(rope)
    rope_constant = ((("str", "scale_x"), ("float", 1.5)), (("str", "shift_t"), ("int", 0)))
    assert why is None and key == (("attn_precision", ("dtype", "torch.float32")),
                                   ("rope_options", rope_constant))
    assert options_key({**rope, "rope_options": {"scale_x": 2.0, "shift_t": 0}})[1] != key
    assert options_key({**rope, "rope_options": {"scale_x": 1.5, "shift_t": 0.0}})[1] != key  # 0 vs 0.0
    why, _ = options_key({**base, "regional_mask": torch.ones(2)})
    assert why == "the transformer_options entry 'regional_mask' (Tensor)"
    why, _ = options_key({**base, "hook": print})
    assert why is not None and "'hook'" in why


def test_arguments_round_trip_and_unsupported_ones(comfy):
    model_cuda_graph = comfy.module("nodes.model_cuda_graph")
    x, t, refs = torch.randn(2, 3), torch.rand(1), [torch.randn(4), torch.randn(5)]
    value = ((x, t), (("control", None), ("guidance", 3.5), ("ref_latents", refs), ("method", "index")))
    tensors = []
    template = model_cuda_graph.flatten_arguments(value, tensors)
    assert [id(a) for a in tensors] == [id(x), id(t), id(refs[0]), id(refs[1])]
    hash(template)
    copies = [a.clone() for a in tensors]
    rebuilt = model_cuda_graph.rebuild_arguments(template, copies)
    assert rebuilt[0][0] is copies[0] and rebuilt[0][1] is copies[1]
    expected = {"control": None, "guidance": 3.5, "ref_latents": copies[2:], "method": "index"}
    assert dict(rebuilt[1]) == expected
    assert isinstance(dict(rebuilt[1])["ref_latents"], list)
    with pytest.raises(model_cuda_graph.UnsupportedArgument, match="dict"):
        model_cuda_graph.flatten_arguments({"a": x}, [])
    with pytest.raises(model_cuda_graph.UnsupportedArgument, match="Size"):
        model_cuda_graph.flatten_arguments(x.shape, [])  # a tuple subclass would come back as a tuple
    templates = {model_cuda_graph.flatten_arguments(v, []) for v in (True, 1, 1.0)}
    assert len(templates) == 3  # equal values of different types are different constants


def test_weights_guard_tracks_storage_and_blocks_offload(comfy):
    model_cuda_graph = comfy.module("nodes.model_cuda_graph")
    lora_branch = comfy.module("quant.lora_branch")
    model = build_tiny_model(FLUX, seed=2)
    weights_guard = model_cuda_graph.WeightsGuard(model)
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

    int8 = build_tiny_model(FLUX, seed=2)
    quantizer = comfy.module("quant.model_quantizer")
    names, _kept = quantizer.plan_quantization(int8)
    int8 = quantizer.quantized_copy(int8, names, comfy.module("nodes.comfy_int8_ops").make_int8_layer)
    int8_guard = model_cuda_graph.WeightsGuard(int8)
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
    assert len(cache) == 0 and cache.captures == 0 and cache.disabled is None


# ---- GPU: the graphs themselves ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_modules():
    """The pack's node modules imported without the full ComfyUI (only ``comfy.*`` model code)."""
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from _pack import import_node_module

    return {name: import_node_module(name) for name in ("model_cuda_graph", "fused_flux", "comfy_int8_ops")}


def _dtype(spec: TinyModelSpec) -> torch.dtype:
    # Wan runs its patch embedding in fp32 (``x.float()``), which ComfyUI's casting ops allow and plain
    # modules do not: the tiny Wan stays fp32.
    return torch.float32 if spec.family == "wan" else torch.bfloat16


def _inputs(spec: TinyModelSpec, seed: int, size: int = 8) -> dict:
    """Random inputs of ``spec``'s model on the GPU (latent size x size, activations in its dtype)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(_dtype(spec))

    frames = (1,) if spec.family == "wan" else ()
    latent = (1, spec.in_channels, *frames, size, size)
    inputs = {"x": randn(*latent), "timestep": torch.rand(1, device="cuda", generator=g),
              "context": randn(1, spec.context_tokens, spec.context_dim)}
    if spec.pooled_dim:
        inputs["y"] = randn(1, spec.pooled_dim)
    return inputs


def _variant(gpu_modules, kind: str) -> torch.nn.Module:
    """A tiny model on the GPU: Flux stock bf16, bf16 with fused blocks, INT8 (Triton) with fused blocks;
    SD3 or Wan bf16."""
    spec = {"sd3": SD3, "wan": WAN}.get(kind, FLUX)
    model = build_tiny_model(spec, seed=3, dtype=_dtype(spec)).cuda().eval()
    if kind == "flux int8 fused":
        import dit_quant.quant.model_quantizer as quantizer

        names, _kept = quantizer.plan_quantization(model)
        model = quantizer.quantized_copy(model, names, gpu_modules["comfy_int8_ops"].make_int8_layer).eval()
    if kind.endswith("fused"):
        for path, forward in gpu_modules["fused_flux"].fused_block_forwards(model).items():
            model.get_submodule(path.removesuffix(".forward")).forward = forward
    return model


def _run(model, inputs: dict, graphed=None, mode=torch.no_grad) -> torch.Tensor:
    """One call of the model under ``mode``, with ``graphed`` installed as its forward when given."""
    if graphed is not None:
        model.forward = graphed
    rest = {k: v for k, v in inputs.items() if k not in ("x", "timestep")}
    try:
        with mode():
            return model(inputs["x"], inputs["timestep"], **rest)  # as ComfyUI's apply_model calls it
    finally:
        if graphed is not None:
            del model.forward


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])  # ComfyUI samples in the latter
@pytest.mark.parametrize("kind", ["flux bf16", "flux bf16 fused", "flux int8 fused", "sd3"])
def test_replay_equals_eager_gpu(gpu_modules, kind, mode):
    model = _variant(gpu_modules, kind)
    spec = SD3 if kind == "sd3" else FLUX
    inputs = [_inputs(spec, seed) for seed in (10, 11, 12)]
    eager = [_run(model, i, mode=mode) for i in inputs]
    graphed = gpu_modules["model_cuda_graph"].ModelCudaGraph(model)
    outs = [_run(model, i, graphed, mode) for i in (*inputs, inputs[0])]
    assert graphed.graphs.captures == 1 and graphed.graphs.replays == 3, graphed.graphs.disabled
    for out, want in zip(outs, [*eager, eager[0]], strict=True):
        assert torch.isfinite(out).all()
        assert torch.equal(out, want)
    assert not torch.equal(outs[1], outs[2])  # each replay computed its own inputs
    graphed.release()
    assert len(graphed.graphs) == 0


@pytest.mark.gpu
def test_wan_builds_a_cpu_constant_and_runs_eagerly_gpu(gpu_modules, caplog):
    """ComfyUI 0.3.75's Wan builds its timestep embedding from a CPU ``torch.arange`` copied to the GPU,
    which a capture refuses: the capture fails once, is logged, and every call runs eagerly and exactly."""
    model = _variant(gpu_modules, "wan")
    graphed = gpu_modules["model_cuda_graph"].ModelCudaGraph(model)
    with caplog.at_level(logging.WARNING, logger="dit_quant.kernels"):
        for seed in (40, 41, 40):
            inputs = _inputs(WAN, seed)
            assert torch.equal(_run(model, inputs, graphed), _run(model, inputs))
    assert graphed.graphs.captures == 0 and graphed.graphs.replays == 0
    assert any("cannot be captured" in r.message and "WanModel" in r.message for r in caplog.records)


@pytest.mark.gpu
def test_new_shapes_eviction_and_weight_changes_gpu(gpu_modules):
    model = _variant(gpu_modules, "flux int8 fused")
    graphed = gpu_modules["model_cuda_graph"].ModelCudaGraph(model, max_graphs=1)
    small, large = _inputs(FLUX, 20, size=8), _inputs(FLUX, 21, size=16)
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
def test_constant_options_get_their_own_graph_gpu(gpu_modules):
    """Flux reads ``rope_options`` (floats) while building its position ids: each value gets a graph."""
    model = _variant(gpu_modules, "flux bf16")
    graphed = gpu_modules["model_cuda_graph"].ModelCudaGraph(model)
    inputs = _inputs(FLUX, 50)
    outs = []
    for scale in (1.0, 1.0, 2.0, 2.0):
        call = {**inputs, "transformer_options": {"rope_options": {"scale_x": scale, "scale_y": 1.0}}}
        outs.append(_run(model, call, graphed))
        assert torch.equal(outs[-1], _run(model, call))
    assert graphed.graphs.captures == 2 and graphed.graphs.replays == 2
    assert not torch.equal(outs[1], outs[2])


@pytest.mark.gpu
def test_offloaded_weights_release_the_graphs_gpu(gpu_modules):
    """A layer that starts computing its weight per call (ComfyUI's low-VRAM patches) sends calls down
    the eager path and frees the graphs; once it stops, the pass is captured again."""
    model = _variant(gpu_modules, "flux bf16")
    graphed = gpu_modules["model_cuda_graph"].ModelCudaGraph(model)
    inputs = _inputs(FLUX, 60)
    for _ in range(2):
        _run(model, inputs, graphed)
    assert len(graphed.graphs) == 1
    layer = model.double_blocks[0].img_attn.qkv
    layer.weight_function = [lambda w: w * 1.0]
    assert torch.equal(_run(model, inputs, graphed), _run(model, inputs))
    assert len(graphed.graphs) == 0
    layer.weight_function = []
    for _ in range(2):
        assert torch.equal(_run(model, inputs, graphed), _run(model, inputs))
    assert graphed.graphs.captures == 1 and graphed.graphs.replays == 1 and len(graphed.graphs) == 1


@pytest.mark.gpu
def test_tensor_in_options_runs_eagerly_gpu(gpu_modules):
    model = _variant(gpu_modules, "flux bf16")
    graphed = gpu_modules["model_cuda_graph"].ModelCudaGraph(model)
    inputs = {**_inputs(FLUX, 70), "transformer_options": {"regional_mask": torch.ones(4, device="cuda")}}
    for _ in range(2):
        assert torch.equal(_run(model, inputs, graphed), _run(model, inputs))
    assert graphed.graphs.captures == 0


@pytest.mark.gpu
def test_patched_options_run_eagerly_gpu(gpu_modules):
    model = _variant(gpu_modules, "flux bf16 fused")
    graphed = gpu_modules["model_cuda_graph"].ModelCudaGraph(model)
    seen = []

    def replace(args, extra):
        seen.append(args["img"].shape)
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("single_block", 0): replace}}}
    inputs = {**_inputs(FLUX, 30), "transformer_options": options}
    for _ in range(2):
        assert torch.equal(_run(model, inputs, graphed), _run(model, inputs))
    assert graphed.graphs.captures == 0 and len(seen) == 4  # the patch ran on every call


@pytest.mark.gpu
def test_graph_cache_failures_stay_eager_gpu(gpu_modules, caplog):
    cuda_graphs = sys.modules["dit_quant.kernels.cuda_graphs"]
    x = torch.randn(64, device="cuda")

    def syncs(a):
        return a * float(a.sum().item())  # a host sync: capture fails

    cache = cuda_graphs.CudaGraphCache("a syncing function")
    with caplog.at_level(logging.WARNING, logger="dit_quant.kernels"):
        for _ in range(3):
            assert torch.equal(cache(syncs, [x]), syncs(x))
    assert cache.captures == 0 and cache.disabled is None
    assert any("cannot be captured" in r.message for r in caplog.records)
    torch.randn(8, device="cuda")  # the failed capture left the device's random generator usable

    other = torch.randn(32, device="cuda")
    short = cuda_graphs.CudaGraphCache("a capture that runs out of memory")
    short(lambda a: a + 1, [other])  # one graph held

    def oom_in_capture(a):
        if torch.cuda.is_current_stream_capturing():
            raise torch.OutOfMemoryError("test: no room for the capture's second pass")
        return a * 2

    for _ in range(2):
        assert torch.equal(short(oom_in_capture, [x]), x * 2)  # the eager pass's result, then eager
    assert len(short) == 0 and short.captures == 1  # every graph was freed for the eager path

    tupled = cuda_graphs.CudaGraphCache("a function returning a tuple")
    out = tupled(lambda a: (a + 1, a - 1), [x])
    assert isinstance(out, tuple) and torch.equal(out[0], x + 1)
    assert tupled.disabled is not None and "tuple" in tupled.disabled

    churn = cuda_graphs.CudaGraphCache("a function of a changing float", max_graphs=2)
    for step in range(cuda_graphs.CHURN_CAPTURES + 2):
        scale = 1.0 + step / 7  # baked into each graph: every call captures anew

        def scaled(a, scale=scale):
            return a * scale

        assert torch.equal(churn(scaled, [x], static=scale), x * scale)
    assert churn.disabled is not None and f"{cuda_graphs.CHURN_CAPTURES} captures" in churn.disabled
    assert len(churn) == 0 and churn.captures == 0  # the graphs were freed when they were turned off
