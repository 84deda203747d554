"""torch.compile of a ComfyUI diffusion model whose Linears are the pack's INT8 layers: no graph break
comes from the pack, and the compiled model computes what the eager one does."""

import pathlib

import pytest
import torch
from comfy_harness import TinyModelSpec, build_tiny_model

PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACK_CODE = tuple(str(PACK_ROOT / part) for part in ("kernels", "quant", "nodes"))


@pytest.fixture(scope="module")
def int8_mmdit(comfy):
    spec = TinyModelSpec(family="sd3", depth=2)
    model = build_tiny_model(spec, seed=3)
    quantizer = comfy.module("quant.model_quantizer")
    names, _kept = quantizer.plan_quantization(model)
    int8 = quantizer.quantized_copy(model, names, comfy.module("nodes.comfy_int8_ops").make_int8_layer)
    g = torch.Generator().manual_seed(4)
    inputs = {
        "x": torch.randn(1, spec.in_channels, 16, 16, generator=g).bfloat16(),
        "t": torch.tensor([0.7]),
        "context": torch.randn(1, 8, spec.context_dim, generator=g).bfloat16(),
        "y": torch.randn(1, spec.pooled_dim, generator=g).bfloat16(),
    }
    return int8.eval(), inputs, len(names)


def test_no_graph_break_from_the_pack(int8_mmdit):
    model, inputs, n_int8 = int8_mmdit
    assert n_int8 >= 8
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**inputs)
    ours = [
        str(reason)
        for reason in explanation.break_reasons
        if any(frame.filename.startswith(PACK_CODE) for frame in reason.user_stack)
    ]
    assert ours == [], ours
    assert explanation.graph_count >= 1


def test_compiled_matches_eager(int8_mmdit):
    model, inputs, _ = int8_mmdit
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs)
        compiled = torch.compile(model, backend="aot_eager")(**inputs)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
