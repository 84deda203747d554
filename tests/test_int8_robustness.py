"""INT8 nodes under bad input, low-VRAM offloading and LoRA, in the real ComfyUI."""

import json

import pytest
import torch
from comfy_harness import (
    CaptureLatent,
    TinyModelSpec,
    load_int8_graph,
    quantize_and_save_int8,
    sampling_graph,
    save_random_lora,
    save_tiny_model,
)
from safetensors import safe_open
from safetensors.torch import save_file

SPEC = TinyModelSpec(family="sd3", depth=2)


@pytest.fixture(scope="module")
def files(comfy):
    models = comfy.diffusion_models_dir
    save_tiny_model(models / "robust_sd3.safetensors", SPEC, seed=3)
    int8 = quantize_and_save_int8(comfy, "robust_sd3.safetensors", "robust_sd3_int8")
    return {"float": models / "robust_sd3.safetensors", "int8": int8}


def run_expecting_error(comfy, name: str) -> str:
    with pytest.raises(RuntimeError) as info:
        comfy.run(sampling_graph(["patch", 0], spec=SPEC, extra=load_int8_graph(name)))
    return str(info.value)


def test_plain_checkpoint_is_refused_clearly(comfy, files):
    message = run_expecting_error(comfy, files["float"].name)
    assert "not a DiT Quant INT8 checkpoint" in message


def test_truncated_file_is_refused_and_source_untouched(comfy, files):
    data = files["int8"].read_bytes()
    truncated = comfy.diffusion_models_dir / "truncated_int8.safetensors"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    message = run_expecting_error(comfy, truncated.name)
    assert "truncated_int8.safetensors" in message
    assert files["int8"].read_bytes() == data


def test_foreign_file_is_refused_clearly(comfy, files):
    foreign = comfy.diffusion_models_dir / "foreign.safetensors"
    foreign.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    assert "not a readable safetensors file" in run_expecting_error(comfy, foreign.name)


def test_unknown_architecture_is_refused_clearly(comfy, files):
    with safe_open(str(files["int8"]), framework="pt") as f:
        tensors = {f"mystery.{k}": f.get_tensor(k) for k in f.keys()}
        recipe = json.loads(f.metadata()["dit_quant_recipe"])
    recipe["quantized_layers"] = [f"mystery.{n}" for n in recipe["quantized_layers"]]
    save_file(
        tensors,
        str(comfy.diffusion_models_dir / "mystery_int8.safetensors"),
        metadata={"dit_quant_recipe": json.dumps(recipe)},
    )
    assert "could not detect the model architecture" in run_expecting_error(comfy, "mystery_int8.safetensors")


def test_layer_shape_that_contradicts_the_architecture_is_refused_clearly(comfy, files):
    with safe_open(str(files["int8"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    layer = "joint_blocks.1.x_block.mlp.fc1"
    assert tensors[f"{layer}.weight"].dtype == torch.int8
    for name in ("weight", "weight_scale", "bias"):  # consistent with each other, not with the model
        tensors[f"{layer}.{name}"] = tensors[f"{layer}.{name}"][:-16].contiguous()
    save_file(tensors, str(comfy.diffusion_models_dir / "reshaped_int8.safetensors"), metadata=metadata)
    message = run_expecting_error(comfy, "reshaped_int8.safetensors")
    assert f"{layer}.weight has shape" in message and "another model size" in message


def test_save_refuses_to_overwrite_and_writes_atomically(comfy, files):
    before = files["int8"].read_bytes()
    (model,) = comfy.run_node("LoadInt8DiffusionModel", unet_name=files["int8"].name)
    with pytest.raises(FileExistsError):
        comfy.run_node("SaveInt8Model", model=model, filename="robust_sd3_int8", overwrite=False)
    assert files["int8"].read_bytes() == before
    comfy.run_node("SaveInt8Model", model=model, filename="robust_sd3_int8", overwrite=True)
    assert files["int8"].read_bytes() == before  # loading and saving again is bit-exact
    assert not list(comfy.diffusion_models_dir.glob(".*.partial"))


def test_low_vram_offloading_gives_the_same_output(comfy, files):
    (model,) = comfy.run_node("LoadInt8DiffusionModel", unet_name=files["int8"].name)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 8, generator=g).bfloat16()
    context = torch.randn(1, 8, SPEC.context_dim, generator=g).bfloat16()
    y = torch.randn(1, SPEC.pooled_dim, generator=g).bfloat16()
    dm = model.model.diffusion_model
    with torch.no_grad():
        full = dm(x, torch.tensor([0.7]), context=context, y=y)
        model.load(torch.device("cpu"), lowvram_model_memory=1, full_load=False)
        int8_linear = comfy.module("quant.int8_linear").Int8Linear
        offloaded = [m for m in dm.modules() if isinstance(m, int8_linear) and m.comfy_cast_weights]
        assert offloaded, "ModelPatcher put no INT8 layer into low-VRAM mode"
        low = dm(x, torch.tensor([0.7]), context=context, y=y)
        model.detach()
    assert torch.equal(full, low)


@pytest.mark.parametrize("target", ["unquantized", "quantized"])
def test_lora_on_int8_model_matches_lora_on_bf16(comfy, files, target):
    layers = {
        "unquantized": ["final_layer.linear"],
        "quantized": ["joint_blocks.0.x_block.mlp.fc2", "joint_blocks.1.context_block.attn.qkv"],
    }[target]
    with safe_open(str(files["float"]), framework="pt") as f:
        dims = {layer: tuple(f.get_slice(f"{layer}.weight").get_shape()) for layer in layers}
    loras_dir = comfy.base_dir / "models" / "loras"
    save_random_lora(loras_dir / f"lora_{target}.safetensors", dims, std=0.06)

    def run(model_nodes: dict, ref: list) -> torch.Tensor:
        CaptureLatent.captured.clear()
        comfy.run(sampling_graph(ref, spec=SPEC, extra=model_nodes))
        return CaptureLatent.captured[-1].double()

    lora = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["load", 0], "lora_name": f"lora_{target}.safetensors", "strength_model": 1.0},
    }
    unet = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": files["float"].name, "weight_dtype": "default"},
    }
    bf16 = run({"load": unet}, ["load", 0])
    bf16_lora = run({"load": unet, "lora": lora}, ["lora", 0])
    int8 = run(load_int8_graph(files["int8"].name), ["patch", 0])
    int8_lora = run(
        {
            **load_int8_graph(files["int8"].name),
            "lora": {**lora, "inputs": {**lora["inputs"], "model": ["patch", 0]}},
        },
        ["lora", 0],
    )
    lora_effect = (bf16_lora - bf16).norm() / bf16.norm()
    assert lora_effect > 0.02  # the LoRA visibly changes the image
    err = ((int8_lora - bf16_lora).norm() / bf16_lora.norm()).item()
    base_err = ((int8 - bf16).norm() / bf16.norm()).item()
    # With the LoRA the INT8 model stays as close to bf16 as without it (W8A8 error only).
    int8_effect = ((int8_lora - int8).norm() / int8.norm()).item()
    print(
        f"LoRA on {target} layers: effect {lora_effect:.3f}, INT8+LoRA vs bf16+LoRA {err:.4f}, "
        f"INT8 vs bf16 {base_err:.4f}"
    )
    assert err < max(2 * base_err, 0.03), (err, base_err, lora_effect.item(), int8_effect)
