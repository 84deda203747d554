"""ComfyUI core's per-layer INT8 layout: exact round trips, the legacy header form, clear refusals."""

import json

import pytest
import torch
from dit_quant.quant.comfy_int8_format import (
    LEGACY_METADATA_KEY,
    ComfyInt8FormatError,
    decode_layer_config,
    encode_layer_config,
    export_comfy_int8,
    read_comfy_int8,
)
from dit_quant.quant.int8_weights import dequantize_weight, quantize_weight_per_channel
from safetensors import safe_open
from safetensors.torch import save_file

LAYERS = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0"]


def _our_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, layer in enumerate(LAYERS):
        q, scale = quantize_weight_per_channel(torch.randn(24 + 8 * i, 16, generator=g))
        sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = q, scale
        sd[f"{layer}.bias"] = torch.randn(24 + 8 * i, generator=g).to(torch.bfloat16)
    sd["double_blocks.0.img_mlp.2.weight"] = torch.randn(16, 32, generator=g).to(torch.bfloat16)  # protected
    return sd


def test_layer_config_encoding():
    t = encode_layer_config({"format": "int8_tensorwise"})
    assert t.dtype == torch.uint8 and bytes(t.tolist()) == b'{"format": "int8_tensorwise"}'
    assert decode_layer_config(t, "x.comfy_quant") == {"format": "int8_tensorwise"}
    with pytest.raises(ComfyInt8FormatError, match="x.comfy_quant"):
        decode_layer_config(torch.tensor([1, 2, 255], dtype=torch.uint8), "x.comfy_quant")
    with pytest.raises(ComfyInt8FormatError, match="uint8"):
        decode_layer_config(torch.zeros(3), "x.comfy_quant")


def test_export_then_read_is_bit_exact_through_a_file(tmp_path):
    ours = _our_state_dict()
    exported, metadata = export_comfy_int8(ours, LAYERS)
    for layer in LAYERS:
        assert decode_layer_config(exported[f"{layer}.comfy_quant"], layer) == {"format": "int8_tensorwise"}
        n = ours[f"{layer}.weight"].shape[0]
        assert exported[f"{layer}.weight_scale"].shape == (n, 1)
        assert exported[f"{layer}.weight_scale"].dtype == torch.float32
    assert "double_blocks.0.img_mlp.2.comfy_quant" not in exported
    path = tmp_path / "comfy_int8.safetensors"
    save_file(exported, str(path), metadata=metadata or None)
    with safe_open(str(path), framework="pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()
    back, layers = read_comfy_int8(loaded, header)
    assert layers == sorted(LAYERS)
    assert set(back) == set(ours)
    for key, tensor in ours.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_read_legacy_header_with_per_tensor_scale():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 16, generator=g)
    scale = w.abs().max() / 127
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    sd = {
        "blocks.0.ffn.0.weight": q,
        "blocks.0.ffn.0.weight_scale": scale.reshape(()),
        "blocks.0.ffn.0.bias": torch.randn(12, generator=g),
        "blocks.0.norm3.weight": torch.randn(16, generator=g),
    }
    header = {
        LEGACY_METADATA_KEY: json.dumps(
            {"format_version": "1.0", "layers": {"blocks.0.ffn.0": {"format": "int8_tensorwise"}}}
        )
    }
    ours, layers = read_comfy_int8(sd, header)
    assert layers == ["blocks.0.ffn.0"]
    assert ours["blocks.0.ffn.0.weight_scale"].shape == (12,)
    assert torch.equal(ours["blocks.0.ffn.0.weight"], q)
    # same dequantized weight as ComfyUI's q * scale
    torch.testing.assert_close(
        dequantize_weight(q, ours["blocks.0.ffn.0.weight_scale"]), q.float() * scale, rtol=0, atol=0
    )
    assert torch.equal(ours["blocks.0.norm3.weight"], sd["blocks.0.norm3.weight"])


def test_per_row_scale_shapes_accepted():
    q = torch.randint(-127, 128, (6, 8), dtype=torch.int8)
    for scale in (torch.rand(6) + 0.1, torch.rand(6, 1) + 0.1, torch.rand(1) + 0.1):
        sd = {
            "l.weight": q,
            "l.weight_scale": scale,
            "l.comfy_quant": encode_layer_config({"format": "int8_tensorwise"}),
        }
        ours, _ = read_comfy_int8(sd)
        assert torch.equal(ours["l.weight_scale"], scale.float().reshape(-1).expand(6))


def _one_layer(config=None, **overrides):
    sd = {
        "l.weight": torch.randint(-127, 128, (6, 8), dtype=torch.int8),
        "l.weight_scale": torch.rand(6) + 0.1,
        "l.comfy_quant": encode_layer_config(config or {"format": "int8_tensorwise"}),
    }
    sd.update(overrides)
    return {k: v for k, v in sd.items() if v is not None}


@pytest.mark.parametrize(
    "state_dict,message",
    [
        (_one_layer({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}), "ConvRot"),
        (_one_layer({"format": "float8_e4m3fn"}), "'float8_e4m3fn'"),
        (_one_layer({"format": "int8_tensorwise", "group_size": 64}), "unsupported comfy_quant option"),
        (_one_layer(**{"l.weight_scale": torch.rand(5)}), r"l.weight_scale must hold 1 or 6"),
        (_one_layer(**{"l.weight_scale": torch.rand(6, 2)}), r"l.weight_scale must hold 1 or 6"),
        (_one_layer(**{"l.weight_scale": None}), "lacks its weight or weight_scale"),
        (_one_layer(**{"l.weight": torch.randn(6, 8)}), "l.weight must be a 2-D int8"),
        (_one_layer(**{"l.input_scale": torch.tensor(0.1)}), "static input_scale"),
        (_one_layer(**{"l.weight_scale": torch.tensor([1.0, -1, 1, 1, 1, 1])}), "negative or non-finite"),
        ({"l.weight": torch.zeros(2, 2)}, "not a ComfyUI quantized checkpoint"),
    ],
)
def test_read_refuses_clearly(state_dict, message):
    with pytest.raises(ComfyInt8FormatError, match=message):
        read_comfy_int8(state_dict)


def test_read_refuses_conflicting_header():
    header = {LEGACY_METADATA_KEY: json.dumps({"layers": {"l": {"format": "float8_e4m3fn"}}})}
    with pytest.raises(ComfyInt8FormatError, match="header _quantization_metadata says"):
        read_comfy_int8(_one_layer(), header)
    with pytest.raises(ComfyInt8FormatError, match="lacks a 'layers' object"):
        read_comfy_int8(_one_layer(), {LEGACY_METADATA_KEY: json.dumps({"format_version": "1.0"})})


def test_export_refuses_unfolded_smoothing_and_non_int8_layers():
    ours = _our_state_dict()
    ours[f"{LAYERS[1]}.smooth"] = torch.rand(16) + 0.5
    with pytest.raises(
        ComfyInt8FormatError, match=r"unfolded SmoothQuant vector \(double_blocks.0.img_mlp.0\)"
    ):
        export_comfy_int8(ours, LAYERS)
    with pytest.raises(ComfyInt8FormatError, match="double_blocks.0.img_mlp.2"):
        export_comfy_int8(_our_state_dict(), ["double_blocks.0.img_mlp.2"])
