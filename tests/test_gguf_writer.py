"""Writing GGUF: type rules, atomic writes, clear errors, progress, and the command-line converter."""

import gguf
import pytest
import torch
from convert_gguf import main as convert_main
from dit_quant.quant.gguf_reader import read_gguf
from dit_quant.quant.gguf_type_rules import detect_architecture, plan_tensor
from dit_quant.quant.gguf_writer import SourceTensor, safetensors_sources, write_gguf
from safetensors.torch import save_file


def flux_like_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).bfloat16()

    return {
        "img_in.weight": r(256, 64),
        "img_in.bias": r(256),
        "double_blocks.0.img_attn.proj.weight": r(256, 256),
        "double_blocks.0.img_attn.qkv.weight": r(768, 256),
        "double_blocks.0.img_mlp.0.weight": r(1024, 256),
        "double_blocks.0.img_mlp.2.weight": r(256, 1024),
        "double_blocks.0.img_attn.norm.key_norm.scale": r(128),
        "single_blocks.0.linear1.weight": r(1536, 256),
        "single_blocks.0.linear2.weight": r(256, 1280),
        "single_blocks.0.odd.weight": r(64, 96),
        "final_layer.linear.weight": r(64, 256),
    }


def sources_of(state_dict) -> dict[str, SourceTensor]:
    return {
        k: SourceTensor(v.shape, v.dtype, k.endswith(".weight") and v.dim() >= 2, lambda v=v: v)
        for k, v in state_dict.items()
    }


def test_type_rules_for_q4_k_m():
    types = {
        p.key: (p.qtype, p.reason)
        for p in (
            plan_tensor(k, v.shape, v.dtype, "Q4_K_M", k.endswith(".weight") and v.dim() >= 2)
            for k, v in flux_like_state_dict().items()
        )
    }
    assert types["img_in.weight"] == ("BF16", "embedder or final layer")
    assert types["final_layer.linear.weight"][0] == "BF16"
    assert types["img_in.bias"] == ("F32", "1-D or small")
    assert types["double_blocks.0.img_attn.norm.key_norm.scale"][0] == "F32"
    assert types["double_blocks.0.img_attn.proj.weight"] == ("Q4_K", "preset")
    assert types["double_blocks.0.img_mlp.0.weight"][0] == "Q4_K"
    for bumped in (
        "double_blocks.0.img_mlp.2.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear2.weight",
    ):
        assert types[bumped] == ("Q5_K", "sensitive layer, one type up")
    assert types["single_blocks.0.odd.weight"][0] == "Q5_0"  # rows of 96: K-quant falls back like llama.cpp


def test_uniform_preset_and_float_presets():
    shape = torch.Size([256, 1024])
    assert (
        plan_tensor("double_blocks.0.img_mlp.2.weight", shape, torch.bfloat16, "Q4_K", True).qtype == "Q4_K"
    )
    assert (
        plan_tensor("double_blocks.0.img_mlp.2.weight", shape, torch.bfloat16, "Q8_0", True).qtype == "Q8_0"
    )
    assert plan_tensor("x.weight", shape, torch.float16, "F16", True).qtype == "F16"
    assert plan_tensor("x.weight", torch.Size([64, 100]), torch.bfloat16, "Q8_0", True).qtype == "BF16"
    assert plan_tensor("pos_embed", torch.Size([1, 64, 256]), torch.float32, "Q4_K", False).qtype == "F32"
    with pytest.raises(ValueError, match="unknown GGUF preset"):
        plan_tensor("x.weight", shape, torch.bfloat16, "Q7_K", True)


def test_architecture_detection():
    assert detect_architecture(flux_like_state_dict()) == "flux"
    assert detect_architecture(["joint_blocks.0.x_block.attn.qkv.weight"]) == "sd3"
    assert detect_architecture(["head.modulation", "blocks.0.ffn.2.weight"]) == "wan"
    with pytest.raises(ValueError, match="cannot tell the model family"):
        detect_architecture(["foo.weight"])


def test_write_reports_progress_and_stores_original_shapes(tmp_path):
    state_dict = flux_like_state_dict()
    state_dict["conv.weight"] = torch.randn(64, 16, 4, 4).bfloat16()
    progress = []
    write_gguf(
        tmp_path / "f.gguf", sources_of(state_dict), "Q8_0", progress=lambda d, t: progress.append((d, t))
    )
    assert progress == [(i + 1, len(state_dict)) for i in range(len(state_dict))]
    model = read_gguf(tmp_path / "f.gguf")
    assert model.architecture == "flux"
    conv = model.tensors["conv.weight"]
    assert conv.qtype.name == "Q8_0" and conv.shape == (64, 16, 4, 4)
    reader = gguf.GGUFReader(tmp_path / "f.gguf")
    field = reader.get_field("comfy.gguf.orig_shape.conv.weight")
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32] and field.contents() == [
        64,
        16,
        4,
        4,
    ]
    assert reader.get_field("general.quantization_version").contents() == gguf.GGML_QUANT_VERSION


def test_failed_write_leaves_no_file(tmp_path):
    state_dict = flux_like_state_dict()
    state_dict["double_blocks.0.img_mlp.0.weight"][3, 5] = float("nan")
    target = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_gguf(target, sources_of(state_dict), "Q4_K")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep.gguf").write_bytes(b"old")
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_gguf(tmp_path / "keep.gguf", sources_of(state_dict), "Q4_K")
    assert (tmp_path / "keep.gguf").read_bytes() == b"old"  # the previous file is untouched


def test_cli_converts_safetensors_and_requantizes_gguf(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in flux_like_state_dict().items()}, str(source))
    target = tmp_path / "model-Q4_K_M.gguf"
    assert convert_main([str(source), str(target), "--preset", "Q4_K_M"]) == 0
    model = read_gguf(target)
    assert model.tensors["double_blocks.0.img_mlp.2.weight"].qtype.name == "Q5_K"
    assert set(model.tensors) == set(flux_like_state_dict())
    assert convert_main([str(source), str(target)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    again = tmp_path / "again.gguf"
    assert convert_main([str(target), str(again), "--preset", "Q4_K"]) == 0  # from GGUF: Q4_K bytes copied
    before, after = read_gguf(target).tensors, read_gguf(again).tensors
    key = "double_blocks.0.img_attn.proj.weight"
    assert torch.equal(before[key].data, after[key].data)
    assert convert_main([str(source), str(tmp_path / "x.gguf"), "--dry-run"]) == 0
    assert "double_blocks.0.img_mlp.2.weight" in capsys.readouterr().out
    assert not (tmp_path / "x.gguf").exists()


def test_safetensors_sources_reject_integer_tensors(tmp_path):
    path = tmp_path / "ints.safetensors"
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.int32)}, str(path))
    with pytest.raises(ValueError, match="only float tensors"):
        safetensors_sources(path)
