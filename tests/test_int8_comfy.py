"""INT8 W8A8 end to end in a real ComfyUI: pack loading, quantize → save → load → KSampler."""

import pytest
import torch
from comfy_harness import TinyModelSpec, quantize_and_save_int8, rel_err, sample_latent, save_tiny_model

NODE_NAMES = ["LoadInt8DiffusionModel", "QuantizeModelInt8", "SaveInt8Model", "Int8KernelPatch"]


FAMILIES = {"sd3": TinyModelSpec(family="sd3", depth=2), "wan": TinyModelSpec(family="wan", depth=2)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny_file(comfy, family):
    path = comfy.diffusion_models_dir / f"tiny_{family}.safetensors"
    if not path.exists():
        save_tiny_model(path, FAMILIES[family], seed=0)
    return path.name


def sample(comfy, model_nodes: dict, model_ref: list, family: str, seed: int = 1) -> torch.Tensor:
    return sample_latent(comfy, model_nodes, model_ref, seed=seed, spec=FAMILIES[family])


def test_pack_loads_through_comfyui_loader(comfy):
    for name in NODE_NAMES:
        assert name in comfy.modules["loaded_node_classes"]
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[name]
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == cls.DISPLAY_NAME
        assert cls.CATEGORY.startswith("DiT Quant")
        for spec in cls.INPUT_TYPES()["required"].values():
            assert "tooltip" in spec[1]


@pytest.fixture(scope="module")
def int8_file(comfy, tiny_file, family):
    path = quantize_and_save_int8(comfy, tiny_file, f"tiny_{family}_int8")
    assert path.exists()
    return path


# Per family: a layer that must stay high precision (output) and the input embedder's key prefix.
KEPT = {"sd3": ("final_layer.linear", "x_embedder"), "wan": ("head.head", "patch_embedding")}


def test_saved_checkpoint_keeps_layers_int8(comfy, int8_file, family):
    checkpoint = comfy.module("quant.int8_checkpoint")
    state_dict, recipe = checkpoint.load_int8_checkpoint(int8_file)
    assert len(recipe["quantized_layers"]) >= 8  # attention + MLP (+ modulation) of 2 blocks
    for layer in recipe["quantized_layers"]:
        assert state_dict[f"{layer}.weight"].dtype == torch.int8
        assert state_dict[f"{layer}.weight_scale"].dtype == torch.float32
    final, embedder = KEPT[family]
    assert final in recipe["protected_layers"]
    assert state_dict[f"{final}.weight"].dtype == torch.bfloat16
    assert not any(k.startswith(embedder) and v.dtype == torch.int8 for k, v in state_dict.items())


def test_loaded_int8_model_holds_int8_weights(comfy, int8_file):
    (model,) = comfy.run_node("LoadInt8DiffusionModel", unet_name=int8_file.name)
    int8_linear = comfy.module("quant.int8_linear").Int8Linear
    layers = [m for m in model.model.diffusion_model.modules() if isinstance(m, int8_linear)]
    assert layers and all(m.weight.dtype == torch.int8 for m in layers)
    float_bytes = sum(
        p.numel() * p.element_size()
        for m in layers
        for p in m.parameters()
        if p.is_floating_point() and p.ndim == 2
    )
    assert float_bytes == 0  # no float copy of any quantized weight


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_int8_sampling_matches_bf16(comfy, tiny_file, int8_file, family, backend):
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_file, "weight_dtype": "default"}}
    reference = sample(comfy, {"load": unet}, ["load", 0], family)
    on_the_fly = sample(
        comfy,
        {
            "load": unet,
            "quant": {"class_type": "QuantizeModelInt8", "inputs": {"model": ["load", 0], "keep_layers": ""}},
            "patch": {"class_type": "Int8KernelPatch", "inputs": {"model": ["quant", 0], "backend": backend}},
        },
        ["patch", 0],
        family,
    )
    loaded = sample(
        comfy,
        {
            "load": {"class_type": "LoadInt8DiffusionModel", "inputs": {"unet_name": int8_file.name}},
            "patch": {"class_type": "Int8KernelPatch", "inputs": {"model": ["load", 0], "backend": backend}},
        },
        ["patch", 0],
        family,
    )
    assert torch.isfinite(loaded).all()
    # The saved file reproduces the on-the-fly model exactly.
    assert torch.equal(loaded, on_the_fly)
    # W8A8 of a random-weight model: a few percent of the latent's norm (measured ~1-2%).
    err = rel_err(loaded, reference)
    print(f"latent relative error vs bf16 ({family}, {backend}): {err:.4f}")
    assert 1e-4 < err < 0.05, err
