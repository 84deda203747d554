"""Protection presets on each family's ComfyUI layer names, budgets, and the sensitivity ranking."""

import contextlib

import pytest
import torch
from dit_quant.quant.int8_linear import Int8Linear
from dit_quant.quant.layer_rules import should_quantize
from dit_quant.quant.protection import PRESETS, protection_for_budget, protection_rules
from dit_quant.quant.sensitivity import (
    SensitivityReport,
    SensitivityRow,
    block_of,
    group_by_block,
    measure_sensitivity,
    relative_error,
)

# Linear layer names of one block per family, as ComfyUI v0.3.75's model classes name them
# (listed from the real classes built on the meta device; tests/test_smoothquant_comfy.py re-derives them).
FFN_DOWN = [
    "joint_blocks.0.x_block.mlp.fc2",
    "joint_blocks.0.context_block.mlp.fc2",  # SD3 / MMDiT
    "double_blocks.0.img_mlp.2",
    "double_blocks.0.txt_mlp.2",
    "single_blocks.0.linear2",  # Flux
    "blocks.0.ffn.2",  # Wan
    "transformer_blocks.0.img_mlp.net.2",
    "transformer_blocks.0.txt_mlp.net.2",  # Qwen-Image
    "layers.0.feed_forward.w2",
    "noise_refiner.0.feed_forward.w2",  # Lumina2 / Z-Image
    "double_stream_blocks.0.block.ff_i.shared_experts.w2",
    "double_stream_blocks.0.block.ff_i.experts.3.w2",
    "double_stream_blocks.0.block.ff_t.w2",  # HiDream
]
ATTN_OUT = [
    "joint_blocks.0.x_block.attn.proj",
    "joint_blocks.0.context_block.attn.proj",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.txt_attn.proj",
    "blocks.0.self_attn.o",
    "blocks.0.cross_attn.o",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.to_add_out",
    "layers.0.attention.out",
    "double_stream_blocks.0.block.attn1.to_out",
    "double_stream_blocks.0.block.attn1.to_out_t",
]
OTHER_BLOCK_LAYERS = [
    "joint_blocks.0.x_block.attn.qkv",
    "joint_blocks.0.x_block.mlp.fc1",
    "joint_blocks.0.x_block.adaLN_modulation.1",
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_mlp.0",
    "double_blocks.0.img_mod.lin",
    "single_blocks.0.linear1",
    "single_blocks.0.modulation.lin",
    "blocks.0.self_attn.q",
    "blocks.0.cross_attn.k_img",
    "blocks.0.ffn.0",
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.img_mlp.net.0.proj",
    "transformer_blocks.0.img_mod.1",
    "layers.0.attention.qkv",
    "layers.0.feed_forward.w1",
    "layers.0.feed_forward.w3",
    "layers.0.adaLN_modulation.1",
    "double_stream_blocks.0.block.attn1.to_q_t",
    "double_stream_blocks.0.block.ff_i.experts.0.w1",
]
ALWAYS_PROTECTED = [
    "x_embedder.proj",
    "t_embedder.mlp.0",
    "context_embedder",
    "final_layer.linear",
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "guidance_in.out_layer",
    "text_embedding.0",
    "time_projection.1",
    "head.head",
    "proj_out",
    "norm_out.linear",
    "cap_embedder.1",
    "caption_projection.0.linear",
    "p_embedder.pooled_embedder.linear_1",
]


def _quantized(name, preset):
    return should_quantize(name, 256, 256, protection_rules(preset))[0]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_classify_every_family(preset):
    for name in FFN_DOWN:
        assert _quantized(name, preset) == (preset == "none"), name
    for name in ATTN_OUT:
        assert _quantized(name, preset) == (preset != "ffn_down+attn_out"), name
    for name in OTHER_BLOCK_LAYERS:
        assert _quantized(name, preset), name
    for name in ALWAYS_PROTECTED:
        assert not _quantized(name, preset), name


def test_extra_layers_and_unknown_preset():
    rules = protection_rules("none", extra_layers=["double_blocks.0.img_attn.qkv"])
    assert should_quantize("double_blocks.0.img_attn.qkv", 256, 256, rules) == (
        False,
        "protected: sensitivity budget",
    )
    assert should_quantize("double_blocks.1.img_attn.qkv", 256, 256, rules)[0]
    with pytest.raises(ValueError, match="unknown protection preset"):
        protection_rules("everything")


def test_protection_for_budget():
    counts = {"a": 50, "b": 30, "c": 10, "d": 10}  # 100 parameters in all
    assert protection_for_budget(["b", "a", "c", "d"], counts, 0.35) == ["b"]
    assert protection_for_budget(["a", "b", "c", "d"], counts, 0.45) == ["b", "c"]  # a does not fit; b, c do
    assert protection_for_budget(["a", "b", "c", "d"], counts, 1.0) == ["a", "b", "c", "d"]
    assert protection_for_budget(["a", "b"], counts, 0.0) == []
    with pytest.raises(ValueError, match="fraction"):
        protection_for_budget(["a"], counts, 3.0)
    with pytest.raises(ValueError, match="zz"):
        protection_for_budget(["zz"], counts, 0.5)


def test_block_grouping():
    assert block_of("double_blocks.3.img_attn.qkv") == "double_blocks.3"
    assert block_of("joint_blocks.0.x_block.mlp.fc2") == "joint_blocks.0"
    assert block_of("double_stream_blocks.2.block.ff_t.w2") == "double_stream_blocks.2"
    assert block_of("noise_refiner.1.attention.out") == "noise_refiner.1"
    assert block_of("final_layer.linear") == "final_layer.linear"
    assert group_by_block(["layers.0.a", "layers.1.b", "layers.0.c", "x"]) == {
        "layers.0": ["layers.0.a", "layers.0.c"],
        "layers.1": ["layers.1.b"],
        "x": ["x"],
    }


class Chain(torch.nn.Module):
    """Four Linear layers in a chain; the input of layer "l2" gets 40× outlier channels (built in
    deliberately, random weights have none), so quantizing l2 alone should hurt the output most."""

    def __init__(self, k=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleDict({f"l{i}": torch.nn.Linear(k, k) for i in range(4)})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * k**-0.5)
        self.boost = torch.ones(k)
        self.boost[[3, 9, 30]] = 40.0

    def forward(self, x):
        for name, layer in self.layers.items():
            if name == "l2":
                x = x * self.boost
            x = torch.tanh(layer(x))
        return x


def test_sensitivity_ranks_the_outlier_layer_first():
    model = Chain()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))

    @contextlib.contextmanager
    def quantize_only(layers):
        originals = {name: model.layers[name.split(".")[-1]] for name in layers}
        for name, layer in originals.items():
            model.layers[name.split(".")[-1]] = Int8Linear.from_float(
                layer.weight.detach(), layer.bias.detach()
            )
        try:
            yield
        finally:
            for name, layer in originals.items():
                model.layers[name.split(".")[-1]] = layer

    names = [f"layers.l{i}" for i in range(4)]
    calls = []
    report = measure_sensitivity(
        {n: [n] for n in names},
        {n: 64 * 64 + 64 for n in names},
        lambda: model(x),
        quantize_only,
        progress=lambda i, n: calls.append((i, n)),
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert report.ranked_names()[0] == "layers.l2"
    errors = [r.relative_error for r in report.rows]
    assert errors == sorted(errors, reverse=True) and all(e > 0 for e in errors)
    with quantize_only(["layers.l2"]):  # the reported number is the measured one
        assert report.rows[0].relative_error == pytest.approx(relative_error(model(x), Chain()(x)), rel=1e-12)
    assert report.protection_for_budget(0.25) == ["layers.l2"]
    table = report.table()
    assert table.splitlines()[1].split()[:2] == ["1", "layers.l2"]
    image = report.chart()
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05  # drawn, not blank


def test_block_units_expand_to_their_layers():
    members = group_by_block(["blocks.0.x", "blocks.0.y", "blocks.1.x"])
    rows = [SensitivityRow("blocks.1", 10, 0.5), SensitivityRow("blocks.0", 20, 0.1)]
    report = SensitivityReport(rows, "block", members)
    assert report.protection_for_budget(0.4) == ["blocks.1.x"]
    assert report.protection_for_budget(1.0) == ["blocks.1.x", "blocks.0.x", "blocks.0.y"]


def test_relative_error_checks_shapes():
    a = torch.randn(3, 4)
    assert relative_error([a, a], [a, a]) == 0.0
    assert relative_error(a * 1.5, a) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        relative_error(a, a[:2])
