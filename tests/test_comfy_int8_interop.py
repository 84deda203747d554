"""ComfyUI core's INT8 layout through the pack's nodes in a real ComfyUI: quantize → Save INT8 Model
(format comfy_int8) → Load Diffusion Model (INT8) → KSampler gives exactly what the dit_quant file gives;
legacy-header and per-tensor-scale files load; smoothed models and damaged files are refused clearly."""

import json

import pytest
import torch
from calibration_harness import register, smoothquant_nodes
from comfy_harness import TinyModelSpec, load_int8_graph, rel_err, sample_latent, save_tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

SPEC = TinyModelSpec(family="sd3", depth=2)
BASE = "interop_sd3"


def sample_file(comfy, unet_name: str) -> torch.Tensor:
    return sample_latent(comfy, load_int8_graph(unet_name), ["patch", 0], spec=SPEC)


def save_node(model_ref: list, filename: str, layout: str) -> dict:
    return {
        "class_type": "SaveInt8Model",
        "inputs": {"model": model_ref, "filename": filename, "overwrite": True, "format": layout},
    }


def read_raw(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def write_raw(comfy, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(comfy.diffusion_models_dir / name), metadata
    )
    return name


@pytest.fixture(scope="module")
def files(comfy):
    """One quantized model saved twice from the same graph: dit_quant and comfy_int8."""
    models = comfy.diffusion_models_dir
    save_tiny_model(models / f"{BASE}.safetensors", SPEC, seed=4)
    comfy.run(
        {
            "load": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": f"{BASE}.safetensors", "weight_dtype": "default"},
            },
            "quant": {"class_type": "QuantizeModelInt8", "inputs": {"model": ["load", 0], "keep_layers": ""}},
            "ours": save_node(["quant", 0], f"{BASE}_dit_quant", "dit_quant"),
            "comfy": save_node(["quant", 0], f"{BASE}_comfy_int8", "comfy_int8"),
        }
    )
    return {
        "float": models / f"{BASE}.safetensors",
        "dit_quant": models / f"{BASE}_dit_quant.safetensors",
        "comfy_int8": models / f"{BASE}_comfy_int8.safetensors",
    }


@pytest.fixture(scope="module")
def ours(comfy, files):
    """(state dict, recipe) of the dit_quant file."""
    return comfy.module("quant.int8_checkpoint").load_int8_checkpoint(files["dit_quant"])


def test_comfy_int8_file_is_in_comfyui_core_layout(comfy, files, ours):
    interop = comfy.module("quant.comfy_int8_format")
    checkpoint = comfy.module("quant.int8_checkpoint")
    state_dict, recipe = ours
    raw, metadata = read_raw(files["comfy_int8"])
    layers = recipe["quantized_layers"]
    assert len(layers) >= 8
    for layer in layers:
        config = interop.decode_layer_config(raw[f"{layer}.comfy_quant"], layer)
        assert config == {"format": "int8_tensorwise"}
        assert torch.equal(raw[f"{layer}.weight"], state_dict[f"{layer}.weight"])
        n = state_dict[f"{layer}.weight"].shape[0]
        assert raw[f"{layer}.weight_scale"].dtype == torch.float32
        assert torch.equal(raw[f"{layer}.weight_scale"], state_dict[f"{layer}.weight_scale"].reshape(n, 1))
    marked = {k[: -len(".comfy_quant")] for k in raw if k.endswith(".comfy_quant")}
    assert marked == set(layers)
    assert not any(k.endswith(".smooth") for k in raw)
    others = {k for k in raw if not k.endswith(".comfy_quant")}
    assert others == set(state_dict)
    assert checkpoint.RECIPE_KEY not in metadata and "_quantization_metadata" not in metadata
    assert json.loads(metadata[checkpoint.SOURCE_RECIPE_KEY]) == recipe


def test_stock_comfyui_detects_the_architecture_of_the_comfy_int8_file(comfy, files):
    """ComfyUI's own detection, on the raw file (comfy_quant and weight_scale tensors included), finds the
    same SD3 configuration as on the bf16 source."""
    import comfy.model_detection as model_detection
    import comfy.supported_models as supported_models

    raw, _ = read_raw(files["comfy_int8"])
    float_sd, _ = read_raw(files["float"])
    detected = model_detection.detect_unet_config(raw, "")
    assert detected == model_detection.detect_unet_config(float_sd, "")
    assert detected["depth"] == SPEC.depth
    assert isinstance(model_detection.model_config_from_unet(raw, ""), supported_models.SD3)


def test_comfy_int8_file_loads_int8_and_samples_bit_identically(comfy, files, ours):
    state_dict, recipe = ours
    (model,) = comfy.run_node("LoadInt8DiffusionModel", unet_name=files["comfy_int8"].name)
    loaded = model.model.diffusion_model.state_dict()
    assert set(loaded) == set(state_dict)
    for key, tensor in state_dict.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    int8_linear = comfy.module("quant.int8_linear").Int8Linear
    layers = {n for n, m in model.model.diffusion_model.named_modules() if isinstance(m, int8_linear)}
    assert layers == set(recipe["quantized_layers"])

    reference = sample_file(comfy, files["dit_quant"].name)
    from_comfy_layout = sample_file(comfy, files["comfy_int8"].name)
    assert torch.isfinite(reference).all() and reference.abs().max() > 0
    assert torch.equal(from_comfy_layout, reference)


def test_comfy_int8_file_saved_again_as_dit_quant_equals_the_original(comfy, files):
    """dit_quant → comfy_int8 → load → dit_quant gives back the very same file (tensors and recipe)."""
    comfy.run(
        {
            "load": {
                "class_type": "LoadInt8DiffusionModel",
                "inputs": {"unet_name": files["comfy_int8"].name},
            },
            "save": save_node(["load", 0], f"{BASE}_round_trip", "dit_quant"),
        }
    )
    again = comfy.diffusion_models_dir / f"{BASE}_round_trip.safetensors"
    assert again.read_bytes() == files["dit_quant"].read_bytes()


def test_legacy_header_file_loads(comfy, files, ours):
    """ComfyUI ≤ 0.3.75 form: per-layer configs in the _quantization_metadata header, no comfy_quant
    tensors (and scales stored as [N])."""
    state_dict, recipe = ours
    header = {
        "_quantization_metadata": json.dumps(
            {
                "format_version": "1.0",
                "layers": {layer: {"format": "int8_tensorwise"} for layer in recipe["quantized_layers"]},
            }
        )
    }
    name = write_raw(comfy, f"{BASE}_legacy.safetensors", state_dict, header)
    assert torch.equal(sample_file(comfy, name), sample_file(comfy, files["dit_quant"].name))


def test_per_tensor_scale_file_loads_with_the_scale_it_holds(comfy, files, ours):
    """Per-tensor int8_tensorwise (one scale per layer, stored 0-d or [1]): the loaded layers hold exactly
    that q and scale (broadcast per row), and the model samples within W8A8 error of the bf16 model."""
    state_dict, recipe = ours
    interop = comfy.module("quant.comfy_int8_format")
    tensors = dict(state_dict)
    expected = {}
    for i, layer in enumerate(recipe["quantized_layers"]):
        w = state_dict[f"{layer}.weight"].double() * state_dict[f"{layer}.weight_scale"].double()[:, None]
        scale = (w.abs().max() / 127).float()
        q = torch.round(w / scale.double()).clamp(-127, 127).to(torch.int8)
        tensors[f"{layer}.weight"] = q
        tensors[f"{layer}.weight_scale"] = scale.reshape(()) if i % 2 else scale.reshape(1)
        tensors[f"{layer}.comfy_quant"] = interop.encode_layer_config({"format": "int8_tensorwise"})
        expected[layer] = (q, scale)
    name = write_raw(comfy, f"{BASE}_per_tensor.safetensors", tensors)

    (model,) = comfy.run_node("LoadInt8DiffusionModel", unet_name=name)
    diffusion_model = model.model.diffusion_model
    for layer, (q, scale) in expected.items():
        module = diffusion_model.get_submodule(layer)
        assert torch.equal(module.weight, q)
        assert torch.equal(module.weight_scale, scale.expand(q.shape[0]))
        torch.testing.assert_close(module.dequantized_weight(), q.float() * scale, rtol=0, atol=0)

    bf16 = sample_latent(
        comfy,
        {
            "load": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": files["float"].name, "weight_dtype": "default"},
            }
        },
        ["load", 0],
        spec=SPEC,
    )
    per_tensor = sample_file(comfy, name)
    err = rel_err(per_tensor, bf16)
    print(f"latent relative error vs bf16, per-tensor INT8 file: {err:.4f}")
    assert 1e-4 < err < 0.05, err


@pytest.mark.parametrize(
    "damage,message",
    [
        ("scale_shape", r"joint_blocks\.0\.x_block\.attn\.qkv\.weight_scale must hold 1 or 384 float values"),
        ("convrot", r"'joint_blocks\.0\.x_block\.attn\.qkv' is ConvRot INT8"),
        ("fp8", r"'joint_blocks\.0\.x_block\.attn\.qkv' uses quantization format 'float8_e4m3fn'"),
        ("no_scale", r"'joint_blocks\.0\.x_block\.attn\.qkv' is marked int8_tensorwise but lacks"),
    ],
)
def test_damaged_comfy_int8_file_fails_clearly(comfy, files, damage, message):
    interop = comfy.module("quant.comfy_int8_format")
    layer = "joint_blocks.0.x_block.attn.qkv"
    raw, _ = read_raw(files["comfy_int8"])
    if damage == "scale_shape":
        raw[f"{layer}.weight_scale"] = raw[f"{layer}.weight_scale"][:-1]
    elif damage == "no_scale":
        del raw[f"{layer}.weight_scale"]
    else:
        config = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
        if damage == "fp8":
            config = {"format": "float8_e4m3fn"}
        raw[f"{layer}.comfy_quant"] = interop.encode_layer_config(config)
    name = write_raw(comfy, f"{BASE}_damaged_{damage}.safetensors", raw)
    with pytest.raises(RuntimeError, match=message) as info:
        sample_file(comfy, name)
    assert name in str(info.value)


@pytest.fixture(scope="module")
def smoothquant_nodes_for(comfy, files):
    register(comfy)

    def nodes(fold: str) -> dict:
        graph = smoothquant_nodes(files["float"].name, SPEC, ["a red fox in snow", "a lighthouse"], fold=fold)
        del graph["plain"]
        return graph

    return nodes


def test_smoothed_model_is_refused_for_comfy_int8_and_nothing_is_written(comfy, smoothquant_nodes_for):
    graph = smoothquant_nodes_for("off")
    graph["write"] = save_node(["smooth", 0], f"{BASE}_smoothed", "comfy_int8")
    with pytest.raises(RuntimeError) as info:
        comfy.run(graph)
    text = str(info.value)
    assert "unfolded SmoothQuant vector" in text
    assert "int8_tensorwise layout cannot represent it" in text
    assert "Save with format 'dit_quant' instead" in text
    assert not (comfy.diffusion_models_dir / f"{BASE}_smoothed.safetensors").exists()
    assert not list(comfy.diffusion_models_dir.glob(f".{BASE}_smoothed*"))


def test_fold_only_smoothquant_model_saves_as_comfy_int8_bit_exactly(comfy, smoothquant_nodes_for):
    """Smoothing only where it folds leaves no vector: the model saves in ComfyUI's layout and the file
    samples exactly like the model in memory."""
    graph = smoothquant_nodes_for("only where exact")
    graph["write"] = save_node(["smooth", 0], f"{BASE}_folded", "comfy_int8")
    graph["patch"] = {"class_type": "Int8KernelPatch", "inputs": {"model": ["smooth", 0], "backend": "torch"}}
    in_memory = sample_latent(comfy, graph, ["patch", 0], spec=SPEC)
    raw, metadata = read_raw(comfy.diffusion_models_dir / f"{BASE}_folded.safetensors")
    recipe = json.loads(metadata[comfy.module("quant.int8_checkpoint").SOURCE_RECIPE_KEY])
    assert recipe["smoothquant"]["folded_sites"] and not recipe["smoothquant"]["smoothed_layers"]
    assert any(k.endswith(".comfy_quant") for k in raw) and not any(k.endswith(".smooth") for k in raw)
    assert torch.equal(sample_file(comfy, f"{BASE}_folded.safetensors"), in_memory)
