"""LoRA on INT8 and GGUF models as a side branch, in a real ComfyUI with the stock LoraLoaderModelOnly node.

The quantized weights are never rewritten: every patched quantized Linear gets a low-rank branch
(quant/lora_branch.py, attached by nodes/lora_patcher.py). References and tolerances:

* GGUF (Q8_0, Q4_K): the file's weights dequantized in float32, loaded by ComfyUI's loader in float32,
  the same LoRA files merged into them by ComfyUI. On CPU both sides compute in float32 (ComfyUI's manual
  cast), so they agree up to float32 rounding and summation order: 1e-4 relative (L2), as in the GGUF tests.
* INT8 (plain, and SmoothQuant with per-layer smoothing vectors): the bf16 model the INT8 one was
  quantized from, the LoRAs merged by ComfyUI. Both differ by the W8A8 error of the base model; the branch
  adds none of its own, so with LoRAs the error stays within 1.2x the error without them (+1e-3 for the
  LoRA's share of the activations, which W8A8 also rounds), while the LoRAs change the output by far more.
* Per layer, the branch's contribution equals the float64 update Σ strength·alpha/rank·(x·downᵀ)·upᵀ of
  the LoRA files within 1e-5 relative (computed in float32).
"""

import dataclasses
import functools
import logging
import pathlib
from typing import Any

import pytest
import torch
from calibration_harness import register, smoothquant_nodes
from comfy_harness import (
    CaptureLatent,
    TinyModelSpec,
    quantize_and_save_int8,
    rel_err,
    sample_latent,
    sampling_graph,
    save_random_lora,
    save_tiny_model,
)
from dit_quant.quant.gguf_writer import safetensors_sources, write_gguf
from dit_quant.quant.lora_branch import LowRankBranch, LowRankTerm
from safetensors import safe_open
from safetensors.torch import save_file
from test_gguf_comfy import reference_model

SPEC = TinyModelSpec(family="sd3", depth=4)  # hidden 256: K-quant rows fit the patched layers
CPU = torch.device("cpu")
GGUF_TOLERANCE = 1e-4
BRANCH_TOLERANCE = 1e-5
# Two LoRAs on quantized layers, stacked on one layer (x_block qkv) and alone on others; strengths: one
# positive, one negative.
LORA_A = {
    "layers": ["x_block.attn.qkv", "x_block.mlp.fc2", "context_block.attn.proj"],
    "rank": 4,
    "alpha": 2.0,
}
LORA_B = {"layers": ["x_block.attn.qkv", "x_block.mlp.fc1"], "rank": 8, "alpha": None}
STRENGTHS = (0.7, -0.4)
PROBE = "joint_blocks.1.x_block.attn.qkv"  # patched by both LoRAs


@pytest.fixture(scope="module")
def source(comfy) -> pathlib.Path:
    path = comfy.diffusion_models_dir / "lora_tiny_sd3.safetensors"
    save_tiny_model(path, SPEC, seed=21)
    return path


def layer_shapes(source: pathlib.Path, layers: list[str]) -> dict[str, tuple[int, int]]:
    with safe_open(str(source), framework="pt") as f:
        return {layer: tuple(f.get_slice(f"{layer}.weight").get_shape()) for layer in layers}


@pytest.fixture(scope="module")
def loras(comfy, source) -> list[str]:
    """Two LoRA files (A in bf16 with alpha, B in float32 without) on the layers of LORA_A / LORA_B."""
    names = []
    for i, (spec, dtype) in enumerate([(LORA_A, torch.bfloat16), (LORA_B, torch.float32)]):
        layers = [f"joint_blocks.{b}.{layer}" for b in range(SPEC.depth - 1) for layer in spec["layers"]]
        path = comfy.base_dir / "models" / "loras" / f"side_branch_{'ab'[i]}.safetensors"
        shapes = layer_shapes(source, layers)
        names.append(
            save_random_lora(
                path, shapes, spec["rank"], seed=40 + i, std=0.12, alpha=spec["alpha"], dtype=dtype
            )
        )
    return names


@pytest.fixture(scope="module")
def final_layer_lora(comfy, source) -> str:
    """A LoRA on the unquantized final layer only (ComfyUI merges it into the bf16 weight as usual)."""
    path = comfy.base_dir / "models" / "loras" / "side_branch_final.safetensors"
    return save_random_lora(path, layer_shapes(source, ["final_layer.linear"]), 4, seed=42, std=0.12)


def with_loras(comfy, model, loras: list[str], strengths=STRENGTHS):
    for name, strength in zip(loras, strengths, strict=False):
        (model,) = comfy.run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=strength)
    return model


@dataclasses.dataclass
class Variant:
    """A quantized MODEL of the tiny model and the float MODEL it is compared with."""

    name: str
    model: Any
    reference: Any

    @property
    def is_gguf(self) -> bool:
        return not self.name.startswith("int8")


def smoothquant_model(comfy, unet_name: str, fold: str = "off"):
    """The model of ``smoothquant_nodes``' "smooth" node (calibration over two prompts, α = 0.5, no
    protection preset), its nodes called one by one."""
    register(comfy)
    graph = smoothquant_nodes(unet_name, SPEC, ["a red fox", "a lighthouse"], protection="none", fold=fold)
    outputs: dict[str, tuple] = {}

    def output(node: str) -> tuple:
        if node not in outputs:
            inputs = {
                name: output(value[0])[value[1]] if isinstance(value, list) else value
                for name, value in graph[node]["inputs"].items()
            }
            outputs[node] = comfy.run_node(graph[node]["class_type"], **inputs)
        return outputs[node]

    return output("smooth")[0]


@pytest.fixture(scope="module", params=["int8", "int8_smooth", "Q8_0", "Q4_K"])
def variant(request, comfy, source) -> Variant:
    name = request.param
    (bf16,) = comfy.run_node("UNETLoader", unet_name=source.name, weight_dtype="default")
    if name == "int8":
        (model,) = comfy.run_node("QuantizeModelInt8", model=bf16, keep_layers="")
        reference = bf16
    elif name == "int8_smooth":
        model = smoothquant_model(comfy, source.name)
        smoothed = model.model.diffusion_model.get_submodule(PROBE).smooth
        assert smoothed is not None and not torch.allclose(smoothed, torch.ones_like(smoothed))
        reference = bf16
    else:
        path = comfy.diffusion_models_dir / f"lora_tiny_{name}.gguf"
        write_gguf(path, safetensors_sources(source), name)
        (model,) = comfy.run_node("LoadGGUFDiffusionModel", unet_name=path.name, kernel="auto")
        reference = reference_model(path)
    assert type(model).__name__ == "QuantModelPatcher"  # what every INT8/GGUF-producing node returns
    return Variant(name, model, reference)


@functools.cache
def denoiser_inputs() -> tuple[torch.Tensor, ...]:
    """Fixed random denoiser inputs: latent x, timestep, text context, pooled vector (float32)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, SPEC.in_channels, 16, 16, generator=g)
    context = torch.randn(1, SPEC.context_tokens, SPEC.context_dim, generator=g)
    return x, torch.tensor([600.0]), context, torch.randn(1, SPEC.pooled_dim, generator=g)


class Loaded:
    """Context: the patcher loaded on the CPU (fully, or with every layer offloaded = low-VRAM mode)."""

    def __init__(self, patcher, lowvram: bool = False) -> None:
        self.patcher, self.lowvram = patcher, lowvram

    def __enter__(self):
        import comfy.model_management

        comfy.model_management.unload_all_models()
        self.patcher.patch_model(device_to=CPU, lowvram_model_memory=1 if self.lowvram else 0)
        assert self.patcher.model.model_lowvram == self.lowvram
        return self

    def __exit__(self, *exc) -> None:
        self.patcher.unpatch_model(CPU)

    @property
    def diffusion_model(self) -> torch.nn.Module:
        return self.patcher.model.diffusion_model

    def denoise(self) -> torch.Tensor:
        x, t, context, y = denoiser_inputs()
        with torch.no_grad():
            return self.diffusion_model(x, t, context=context, y=y).float()

    def branched(self) -> set[str]:
        return {n for n, m in self.diffusion_model.named_modules() if getattr(m, "lora_branch", None)}


def denoise(patcher, lowvram: bool = False) -> torch.Tensor:
    with Loaded(patcher, lowvram) as loaded:
        return loaded.denoise()


def quantized_tensors(patcher) -> dict[str, torch.Tensor]:
    """Every quantized weight (INT8 weight + scale, GGUF bytes) of the model, by state-dict key."""
    tensors = {}
    for name, m in patcher.model.diffusion_model.named_modules():
        if getattr(m, "gguf_qtype", None) is not None:
            tensors[f"{name}.weight"] = m.weight
        elif getattr(m, "weight", None) is not None and m.weight.dtype == torch.int8:
            tensors.update({f"{name}.weight": m.weight, f"{name}.weight_scale": m.weight_scale})
    assert len(tensors) >= 16
    return tensors


def patched_quantized_layers(variant: Variant, patcher) -> set[str]:
    keys = {k.removeprefix("diffusion_model.").removesuffix(".weight") for k in patcher.patches}
    return {
        k.removesuffix(".weight") for k in quantized_tensors(variant.model) if k.endswith(".weight")
    } & keys


# ------------------------------------------------------------------------------------------- the math
def test_low_rank_branch_matches_the_float64_update():
    g = torch.Generator().manual_seed(0)
    n, k = 48, 40
    terms = [
        LowRankTerm(torch.randn(4, k, generator=g), torch.randn(n, 4, generator=g), 0.35),
        LowRankTerm(torch.randn(3, k, generator=g), torch.randn(16, 3, generator=g), -1.5, rows=(16, 16)),
        LowRankTerm(
            torch.randn(5, k, generator=g),
            torch.randn(n, 2, generator=g),
            0.8,
            mid=torch.randn(2, 5, 1, 1, generator=g),
        ),
    ]
    expected = torch.zeros(n, k, dtype=torch.float64)
    expected += 0.35 * terms[0].up.double() @ terms[0].down.double()
    expected[16:32] += -1.5 * terms[1].up.double() @ terms[1].down.double()
    expected += 0.8 * terms[2].up.double() @ terms[2].mid[:, :, 0, 0].double() @ terms[2].down.double()
    branch = LowRankBranch(terms, n, k)
    assert branch.down.shape == (9, k) and branch.up.shape == (n, 9)  # R = 4 + 3 + 2 (mid folded)
    x = torch.randn(2, 7, k, generator=g)
    y = torch.randn(2, 7, n, generator=g)
    out = branch.add_to(y.clone(), x)
    reference = y.double() + x.double() @ expected.t()
    assert rel_err(out - y, reference - y.double()) <= BRANCH_TOLERANCE
    bf16 = LowRankBranch(terms, n, k, dtype=torch.bfloat16).add_to(y.bfloat16(), x.bfloat16())
    assert bf16.dtype == torch.bfloat16
    assert rel_err(bf16.float() - y, reference - y.double()) <= 2e-2  # bf16 inputs, products and sums


def test_low_rank_branch_refuses_mismatched_shapes():
    down, up = torch.randn(4, 32), torch.randn(16, 4)
    with pytest.raises(ValueError, match="does not match K=24"):
        LowRankBranch([LowRankTerm(down, up, 1.0)], 16, 24)
    with pytest.raises(ValueError, match="rows 8..24 of N=16"):
        LowRankBranch([LowRankTerm(down, up, 1.0, rows=(8, 16))], 16, 32)


# ------------------------------------------------------------------------------- in the real ComfyUI
@pytest.mark.parametrize("count", [1, 2])
def test_stacked_loras_match_the_float_model_with_loras_merged(comfy, variant, loras, count):
    quantized = with_loras(comfy, variant.model, loras[:count])
    reference = with_loras(comfy, variant.reference, loras[:count])
    with Loaded(quantized) as loaded:
        ours = loaded.denoise()
        assert loaded.branched() == patched_quantized_layers(variant, quantized)  # every one, no merge
    merged = denoise(reference)
    effect = rel_err(merged, denoise(variant.reference))
    err = rel_err(ours, merged)
    assert effect > 0.05
    if variant.is_gguf:
        assert err <= GGUF_TOLERANCE, err
    else:
        base_err = rel_err(denoise(variant.model), denoise(variant.reference))
        assert effect > 5 * base_err, (effect, base_err)  # the LoRAs matter far more than W8A8 error
        assert err <= 1.2 * base_err + 1e-3, (err, base_err)  # measured: err ≈ base_err (1.5e-2)


def branch_delta(patcher, layer_name: str, k: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Loads ``patcher`` and runs one layer on fresh inputs x [5, K] with and without its branch:
    returns (x, output with − output without, the branch)."""
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3))
    with Loaded(patcher) as loaded, torch.no_grad():
        layer = loaded.diffusion_model.get_submodule(layer_name)
        branch = layer.lora_branch
        with_branch = layer(x).double()
        layer.lora_branch = None
        without = layer(x).double()
        layer.lora_branch = branch
    return x, with_branch - without, branch


def test_branch_adds_the_exact_low_rank_update(comfy, variant, loras, source):
    n, k = layer_shapes(source, [PROBE])[PROBE]
    x, delta, _ = branch_delta(with_loras(comfy, variant.model, loras), PROBE, k)
    update = torch.zeros(n, k, dtype=torch.float64)
    for name, spec, strength in zip(loras, (LORA_A, LORA_B), STRENGTHS, strict=True):
        path = comfy.base_dir / "models" / "loras" / name
        with safe_open(str(path), framework="pt") as f:
            up = f.get_tensor(f"diffusion_model.{PROBE}.lora_up.weight").double()
            down = f.get_tensor(f"diffusion_model.{PROBE}.lora_down.weight").double()
        alpha = spec["alpha"] / spec["rank"] if spec["alpha"] else 1.0
        update += strength * alpha * up @ down
    assert rel_err(delta, x.double() @ update.t()) <= BRANCH_TOLERANCE


def test_diffusers_lora_on_q_k_v_is_one_branch_of_the_fused_qkv(comfy, variant, source):
    """A diffusers-format LoRA on to_q/to_k/to_v: ComfyUI patches a row slice (offset) of the fused qkv
    weight per projection; the three become one branch (ranks 2 + 3 + 4)."""
    hidden = 64 * SPEC.depth
    g = torch.Generator().manual_seed(8)
    tensors, update = {}, torch.zeros(3 * hidden, hidden, dtype=torch.float64)
    for i, projection in enumerate(("to_q", "to_k", "to_v")):
        rank = 2 + i
        down, up = torch.randn(rank, hidden, generator=g) * 0.1, torch.randn(hidden, rank, generator=g) * 0.1
        tensors[f"transformer.transformer_blocks.1.attn.{projection}.lora_A.weight"] = down
        tensors[f"transformer.transformer_blocks.1.attn.{projection}.lora_B.weight"] = up
        update[i * hidden : (i + 1) * hidden] = 0.9 * up.double() @ down.double()
    path = comfy.base_dir / "models" / "loras" / "side_branch_diffusers_qkv.safetensors"
    save_file(tensors, str(path))
    patcher = with_loras(comfy, variant.model, [path.name], [0.9])
    assert [p[3] for p in patcher.patches[f"diffusion_model.{PROBE}.weight"]] == [
        (0, i * hidden, hidden) for i in range(3)
    ]
    x, delta, branch = branch_delta(patcher, PROBE, hidden)
    assert branch.down.shape == (9, hidden)
    assert rel_err(delta, x.double() @ update.t()) <= BRANCH_TOLERANCE


def test_quantized_weights_are_never_rewritten(comfy, variant, loras):
    before = quantized_tensors(variant.model)
    copies = {k: v.detach().clone() for k, v in before.items()}
    patcher = with_loras(comfy, variant.model, loras)
    for lowvram in (False, True):
        with Loaded(patcher, lowvram):
            during = quantized_tensors(patcher)
            for key, tensor in during.items():
                assert tensor.data_ptr() == before[key].data_ptr(), key  # same storage
                assert torch.equal(tensor, copies[key]), key  # bit-identical
        assert not patcher.backup  # nothing was merged, so nothing had to be backed up
    for key, tensor in quantized_tensors(patcher).items():
        assert tensor.data_ptr() == before[key].data_ptr() and torch.equal(tensor, copies[key]), key


def test_unpatching_restores_the_exact_output(comfy, variant, loras):
    plain = denoise(variant.model)
    patcher = with_loras(comfy, variant.model, loras)
    assert rel_err(denoise(patcher), plain) > 0.05
    modules = list(patcher.model.diffusion_model.modules())
    assert not any(getattr(m, "lora_branch", None) for m in modules)
    assert not any(getattr(m, "weight_function", None) for m in modules)
    assert torch.equal(denoise(variant.model), plain)


@pytest.mark.parametrize("unquantized", [False, True])
def test_low_vram_offloading_keeps_the_branches(comfy, variant, loras, final_layer_lora, unquantized):
    """Every layer offloaded (ComfyUI's low-VRAM mode), on load and by partially_unload after a full load.

    With the LoRAs on quantized layers only, the result is bit-identical to a full load. A LoRA on the
    unquantized final layer is merged by ComfyUI into its bf16 weight on a full load, but in float32 per
    call when offloaded: that rounding is then the one difference (measured ~2e-3).
    """
    patcher = with_loras(comfy, variant.model, loras)
    if unquantized:
        patcher = with_loras(comfy, patcher, [final_layer_lora], [1.0])
    full = denoise(patcher)
    with Loaded(patcher, lowvram=True) as loaded:
        assert loaded.branched() == patched_quantized_layers(variant, patcher)
        for name in loaded.branched():  # the branch replaced ComfyUI's per-call merge of that weight
            layer = loaded.diffusion_model.get_submodule(name)
            assert layer.comfy_cast_weights and not layer.weight_function
        assert patcher.model.lowvram_patch_counter == int(unquantized)  # the final layer's LowVramPatch
        low = loaded.denoise()
    with Loaded(patcher) as loaded:
        patcher.partially_unload(CPU, memory_to_free=1 << 40)  # offload everything after a full load
        assert patcher.model.model_lowvram
        assert not loaded.diffusion_model.get_submodule(PROBE).weight_function
        assert loaded.branched() == patched_quantized_layers(variant, patcher)
        unloaded = loaded.denoise()
    assert torch.equal(unloaded, low)
    if unquantized:
        assert rel_err(low, full) <= 5e-3
    else:
        assert torch.equal(low, full)


def loha_file(comfy, source, layers: list[str]) -> str:
    g = torch.Generator().manual_seed(77)
    tensors = {}
    for layer, (n, k) in layer_shapes(source, layers).items():
        for w in ("w1", "w2"):
            tensors[f"diffusion_model.{layer}.hada_{w}_a"] = torch.randn(n, 2, generator=g) * 0.2
            tensors[f"diffusion_model.{layer}.hada_{w}_b"] = torch.randn(2, k, generator=g) * 0.2
    path = comfy.base_dir / "models" / "loras" / "side_branch_loha.safetensors"
    save_file(tensors, str(path))
    return path.name


def test_other_patch_types_fall_back_to_merging_with_a_log_line(comfy, variant, loras, source, caplog):
    loha_layers = ["joint_blocks.0.x_block.mlp.fc1", "joint_blocks.2.x_block.mlp.fc1"]
    plain = denoise(variant.model)
    files = [loras[0], loha_file(comfy, source, loha_layers)]
    patcher = with_loras(comfy, variant.model, files, (1.0, 1.0))
    reference = with_loras(comfy, variant.reference, files, (1.0, 1.0))
    with caplog.at_level(logging.INFO), Loaded(patcher) as loaded:
        ours = loaded.denoise()
        branched = loaded.branched()
    assert branched == patched_quantized_layers(variant, patcher) - set(loha_layers)
    lines = [r.getMessage() for r in caplog.records if "side branch" in r.getMessage()]
    assert len(lines) == 1 and "merged into the weight instead (loha patch: 2" in lines[0], lines
    merged = denoise(reference)
    err = rel_err(ours, merged)
    if variant.is_gguf:  # per-call patch of the dequantized weight: as exact as the branch
        assert err <= GGUF_TOLERANCE
    else:  # re-quantized with the layer's scales: W8A8 error plus that rounding
        assert err <= 1.5 * rel_err(plain, denoise(variant.reference)) + 2e-3
    assert torch.equal(denoise(variant.model), plain)  # the merge was undone exactly


def test_lora_on_folded_smoothquant_layers_is_flagged(comfy, source, loras, caplog):
    """Folded smoothing divides a layer's input (and its modulation source's output) by an s the model
    does not keep, so a LoRA there cannot be corrected: the load says so."""
    (bf16,) = comfy.run_node("UNETLoader", unet_name=source.name, weight_dtype="default")
    folded = smoothquant_model(comfy, source.name, fold="where exact")
    assert folded.model.diffusion_model.get_submodule(PROBE).smooth is None  # qkv: folded into adaLN
    with caplog.at_level(logging.WARNING):
        denoise(with_loras(comfy, folded, loras[:1]))
        warnings = [r.getMessage() for r in caplog.records if "folded" in r.getMessage()]
        assert len(warnings) == 1 and "LoRA patches 3 layers" in warnings[0], warnings
        caplog.clear()
        (plain_int8,) = comfy.run_node("QuantizeModelInt8", model=bf16, keep_layers="")
        denoise(with_loras(comfy, plain_int8, loras[:1]))
        assert not [r for r in caplog.records if "folded" in r.getMessage()]


# ----------------------------------------------------------------------------- strength, no reloading
@pytest.fixture(scope="module")
def int8_file(comfy, source) -> str:
    return quantize_and_save_int8(comfy, source.name, "lora_tiny_int8").name


@pytest.mark.parametrize("kind", ["int8", "Q8_0"])
def test_a_new_strength_reuses_the_loaded_model(comfy, source, loras, int8_file, kind):
    if kind == "int8":
        loader = {"class_type": "LoadInt8DiffusionModel", "inputs": {"unet_name": int8_file}}
    else:
        path = comfy.diffusion_models_dir / "lora_tiny_strength_Q8_0.gguf"
        write_gguf(path, safetensors_sources(source), "Q8_0")
        loader = {
            "class_type": "LoadGGUFDiffusionModel",
            "inputs": {"unet_name": path.name, "kernel": "auto"},
        }

    def nodes(strength: float) -> dict:
        lora = {"model": ["base", 0], "lora_name": loras[0], "strength_model": strength}
        return {"base": loader, "lora": {"class_type": "LoraLoaderModelOnly", "inputs": lora}}

    executor = comfy.new_executor()
    latents = []
    for strength in (1.0, 0.5, 1.0):
        CaptureLatent.captured.clear()
        comfy.run(sampling_graph(["lora", 0], spec=SPEC, extra=nodes(strength)), executor)
        latents.append(CaptureLatent.captured[0])
        if len(latents) > 1:
            assert "base" in comfy.cached_nodes(executor)  # the model file was not loaded again
            assert "lora" not in comfy.cached_nodes(executor)
    assert rel_err(latents[1], latents[0]) > 1e-2  # the new strength took effect ...
    assert torch.equal(latents[2], latents[0])  # ... and going back gives the first result again
    fresh = sample_latent(comfy, nodes(0.5), ["lora", 0], spec=SPEC)  # a new executor loads the file anew
    assert torch.equal(latents[1], fresh)
