"""GGUF end to end in a real ComfyUI: our loader and saver nodes, the stock KSampler, saving with LoRA
(LoRA at run time and low-VRAM: test_lora_side_branch.py).

The reference for every comparison is the same model with its GGUF weights dequantized in float32, loaded
by ComfyUI's own loader with dtype float32 and sampled by the same KSampler node. The harness forces a
bf16 unet dtype; on CPU ComfyUI then computes in float32 (manual cast), and our layers dequantize straight
into the compute dtype, so both sides multiply with the same float32 weight values: the latents agree up
to float32 rounding and summation order. Tolerance: 1e-4 relative (L2).
"""

import pathlib

import gguf
import numpy as np
import pytest
import torch
from comfy_harness import (
    CaptureLatent,
    TinyModelSpec,
    rel_err,
    sampling_graph,
    save_random_lora,
    save_tiny_model,
)
from dit_quant.quant.gguf_reader import read_gguf
from dit_quant.quant.gguf_types import WRITABLE_TYPES
from dit_quant.quant.gguf_writer import safetensors_sources, write_gguf

SPEC = TinyModelSpec(family="sd3", depth=4)  # hidden 256: K-quant rows fit most layers
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_source(comfy) -> pathlib.Path:
    path = comfy.diffusion_models_dir / "gguf_tiny_sd3.safetensors"
    if not path.exists():
        save_tiny_model(path, SPEC, seed=5)
    return path


def reference_model(gguf_path: pathlib.Path):
    """The GGUF file's weights dequantized in float32, loaded by ComfyUI's loader in float32."""
    import comfy.sd

    model_file = read_gguf(gguf_path)
    state_dict = {}
    for key, t in model_file.tensors.items():
        state_dict[key] = t.float32().contiguous()
    return comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": torch.float32})


def sample(comfy, model_nodes: dict, steps: int = 1, seed: int = 1) -> torch.Tensor:
    """Runs the graph: model nodes -> KSampler -> captured latent (through ComfyUI's PromptExecutor)."""
    CaptureLatent.captured.clear()
    comfy.run(sampling_graph(["model", 0], seed=seed, steps=steps, spec=SPEC, extra=model_nodes))
    assert len(CaptureLatent.captured) == 1
    return CaptureLatent.captured[0]


def sample_model(comfy, model, steps: int = 1, seed: int = 1) -> torch.Tensor:
    """The same sampling as :func:`sample` (same nodes and inputs) for a MODEL object."""
    graph = sampling_graph(["model", 0], seed=seed, steps=steps, spec=SPEC)
    inputs = {}
    for node in ("pos", "neg", "latent"):
        spec = graph[node]
        inputs[node] = comfy.run_node(spec["class_type"], **spec["inputs"])[0]
    ksampler = {
        k: v
        for k, v in graph["sample"]["inputs"].items()
        if k not in ("model", "positive", "negative", "latent_image")
    }
    (latent,) = comfy.run_node(
        "KSampler",
        model=model,
        positive=inputs["pos"],
        negative=inputs["neg"],
        latent_image=inputs["latent"],
        **ksampler,
    )
    return latent["samples"]


def gguf_loader(name: str, kernel: str = "auto") -> dict:
    return {
        "model": {"class_type": "LoadGGUFDiffusionModel", "inputs": {"unet_name": name, "kernel": kernel}}
    }


def save_gguf_node(model_ref: list, filename: str, preset: str) -> dict:
    return {
        "class_type": "SaveModelGGUF",
        "inputs": {"model": model_ref, "filename": filename, "preset": preset, "overwrite": True},
    }


def sample_with_reference(comfy, path: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The file sampled through our loader, and its reference (:func:`reference_model`) sampled alike."""
    return sample(comfy, gguf_loader(path.name)), sample_model(comfy, reference_model(path))


def test_nodes_registered_with_tooltips(comfy):
    for name in ("LoadGGUFDiffusionModel", "SaveModelGGUF"):
        assert name in comfy.modules["loaded_node_classes"]
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[name]
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == cls.DISPLAY_NAME
        assert cls.CATEGORY == "DiT Quant/GGUF" and cls.DESCRIPTION
        for spec in cls.INPUT_TYPES()["required"].values():
            assert "tooltip" in spec[1]


@pytest.mark.parametrize("qtype", WRITABLE_TYPES)
def test_each_type_samples_like_float32_dequantized_weights(comfy, tiny_source, qtype):
    name = f"gguf_tiny_{qtype}.gguf"
    path = comfy.diffusion_models_dir / name
    write_gguf(path, safetensors_sources(tiny_source), qtype)
    counts = read_gguf(path).type_counts()
    if qtype not in ("F32", "F16", "BF16"):
        assert counts[qtype] >= 16, counts  # attention, MLP and modulation layers of 4 blocks
    ours, reference = sample_with_reference(comfy, path)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, reference) <= TOLERANCE, qtype


def test_save_node_writes_mixed_types_and_reloads(comfy, tiny_source):
    comfy.run(
        {
            "load": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": tiny_source.name, "weight_dtype": "default"},
            },
            "save": save_gguf_node(["load", 0], "gguf_saved_q4km", "Q4_K_M"),
        }
    )
    path = comfy.diffusion_models_dir / "gguf_saved_q4km.gguf"
    model_file = read_gguf(path)
    assert model_file.architecture == "sd3"
    types = {k: t.qtype.name for k, t in model_file.tensors.items()}
    assert types["joint_blocks.0.x_block.mlp.fc2.weight"] == "Q5_K"  # FFN down: one type up
    assert types["joint_blocks.0.x_block.attn.qkv.weight"] == "Q5_K"  # attention qkv: one type up
    assert types["joint_blocks.0.x_block.mlp.fc1.weight"] == "Q4_K"
    assert types["joint_blocks.0.x_block.attn.qkv.bias"] == "F32"
    assert types["final_layer.linear.weight"] == "BF16"  # final layer kept (bf16 source)
    # The community reader (gguf-py) decodes it too.
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(model_file.tensors)
    ours, reference = sample_with_reference(comfy, path)
    assert rel_err(ours, reference) <= TOLERANCE


def test_resaving_a_gguf_model_copies_quantized_bytes(comfy, tiny_source):
    source = comfy.diffusion_models_dir / "gguf_tiny_Q4_K.gguf"
    write_gguf(source, safetensors_sources(tiny_source), "Q4_K")
    comfy.run(
        {
            "load": gguf_loader(source.name)["model"],
            "save": save_gguf_node(["load", 0], "gguf_resaved", "Q4_K"),
        }
    )
    before = read_gguf(source).tensors
    after = read_gguf(comfy.diffusion_models_dir / "gguf_resaved.gguf").tensors
    assert set(before) == set(after)
    for key, t in before.items():
        assert t.qtype.name == after[key].qtype.name
        assert torch.equal(t.data.view(torch.uint8), after[key].data.view(torch.uint8)), key


def make_lora(comfy) -> str:
    """A random LoRA on the attention qkv and MLP fc2 layers of the tiny model (generic key format)."""
    hidden = 64 * SPEC.depth
    shapes = {}
    for block in range(SPEC.depth):
        shapes[f"joint_blocks.{block}.x_block.attn.qkv"] = (3 * hidden, hidden)
        shapes[f"joint_blocks.{block}.x_block.mlp.fc2"] = (hidden, 4 * hidden)
    path = comfy.base_dir / "models" / "loras" / "gguf_tiny_lora.safetensors"
    return save_random_lora(path, shapes, seed=3, dtype=torch.float32)


def with_lora(loader: dict, lora_name: str) -> dict:
    nodes = {"base": loader["model"]}
    nodes["model"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["base", 0], "lora_name": lora_name, "strength_model": 1.0},
    }
    return nodes


def test_community_layout_file_loads(comfy, tiny_source):
    """A file laid out like the community converter writes them: 'model.diffusion_model.' prefix, BF16 main
    type, F32 1-D tensors (written with gguf-py directly, not with our writer)."""
    from safetensors import safe_open

    writer = gguf.GGUFWriter(path=None, arch="sd3")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with safe_open(str(tiny_source), framework="pt") as handle:
        for key in handle.keys():
            value = handle.get_tensor(key).float().numpy()
            if value.ndim == 1 or value.size <= 1024:
                writer.add_tensor(f"model.diffusion_model.{key}", value)
            elif value.shape[-1] % 32 == 0:
                writer.add_tensor(
                    f"model.diffusion_model.{key}",
                    gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                    raw_dtype=gguf.GGMLQuantizationType.Q8_0,
                )
            else:
                writer.add_tensor(f"model.diffusion_model.{key}", value.astype(np.float16))
    path = comfy.diffusion_models_dir / "gguf_community_layout.gguf"
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, reference = sample_with_reference(comfy, path)
    assert rel_err(ours, reference) <= TOLERANCE


def test_corrupt_file_fails_with_a_clear_error(comfy, tiny_source):
    good = comfy.diffusion_models_dir / "gguf_tiny_Q8_0.gguf"
    write_gguf(good, safetensors_sources(tiny_source), "Q8_0")
    bad = comfy.diffusion_models_dir / "gguf_truncated.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="past the end of the file"):
        sample(comfy, gguf_loader(bad.name))


def test_saving_a_gguf_model_with_lora_merges_only_patched_layers(comfy, tiny_source):
    name = "gguf_tiny_Q8_0.gguf"
    write_gguf(comfy.diffusion_models_dir / name, safetensors_sources(tiny_source), "Q8_0")
    nodes = with_lora(gguf_loader(name), make_lora(comfy))
    nodes["save"] = save_gguf_node(["model", 0], "gguf_merged", "Q8_0")
    comfy.run(nodes)
    before = read_gguf(comfy.diffusion_models_dir / name).tensors
    after = read_gguf(comfy.diffusion_models_dir / "gguf_merged.gguf").tensors
    patched, untouched = "joint_blocks.1.x_block.attn.qkv.weight", "joint_blocks.1.x_block.mlp.fc1.weight"
    assert not torch.equal(before[patched].data, after[patched].data)  # LoRA merged, re-quantized
    assert torch.equal(before[untouched].data, after[untouched].data)  # copied byte for byte
    merged = sample(comfy, gguf_loader("gguf_merged.gguf"))
    live = sample(comfy, with_lora(gguf_loader(name), make_lora(comfy)))
    assert rel_err(merged, live) <= 2e-2  # one more Q8_0 rounding of the merged layers
