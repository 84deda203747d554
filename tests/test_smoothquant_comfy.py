"""SmoothQuant + protection end to end in a real ComfyUI, on a tiny MMDiT with deliberately built
activation outliers (see calibration_harness.inject_outliers): calibrate → apply → sample, against plain
per-channel W8A8, judged by the Quantization Quality Evaluation node; save → load round trip."""

import json

import pytest
import torch
from calibration_harness import register, sampling_inputs, save_outlier_mmdit, smoothquant_nodes
from comfy_harness import TinyModelSpec, sample_latent

SPEC = TinyModelSpec(depth=2)
CALIBRATION_PROMPTS = [
    "a red fox in snow",
    'a neon sign that reads "OPEN"',
    "a bowl of ramen",
    "a lighthouse",
]
EVAL_PROMPTS = ["an astronaut riding a horse", "a watercolor of a harbor"]  # not seen in calibration
SEEDS_PER_PROMPT = 8  # 2 prompts × 8 seeds = 16 paired samples


@pytest.fixture(scope="module")
def outlier_model(comfy):
    register(comfy)
    path = comfy.diffusion_models_dir / "tiny_sd3_outliers.safetensors"
    if not path.exists():
        save_outlier_mmdit(path, SPEC, seed=0)
    return path.name


def model_nodes(unet_name: str, protection: str = "ffn_down", fold: str = "off") -> dict:
    return smoothquant_nodes(unet_name, SPEC, CALIBRATION_PROMPTS, protection=protection, fold=fold)


def test_smoothquant_and_protection_halve_the_error_with_a_significant_ci(comfy, outlier_model):
    graph = model_nodes(outlier_model)
    graph["vae"] = {"class_type": "DiTQuantTestVae", "inputs": {}}
    graph["eval"] = {
        "class_type": "QualityEvaluation",
        "inputs": {
            "reference_model": ["load", 0],
            "variant_a": ["smooth", 0],
            "variant_b": ["plain", 0],
            **sampling_inputs(EVAL_PROMPTS, seed=7),
            "seeds_per_prompt": SEEDS_PER_PROMPT,
            "n_boot": 4000,
            "variant_a_name": "smoothquant+ffn_down",
            "variant_b_name": "plain W8A8",
            "vae": ["vae", 0],
        },
    }
    outputs = comfy.run(graph)
    report = json.loads(outputs["eval"]["dit_quant_quality"][0])
    plain = report["variants"]["plain W8A8"]["latent_rel_error"]
    smooth = report["variants"]["smoothquant+ffn_down"]["latent_rel_error"]
    assert len(plain["per_sample"]) == len(smooth["per_sample"]) == 16
    (comparison,) = [c for c in report["comparisons"] if c["metric"] == "latent_rel_error"]
    print(
        f"\nlatent rel. error vs bf16: plain {plain['mean']['mean']:.4f}, "
        f"smoothquant+ffn_down {smooth['mean']['mean']:.4f}, ratio {comparison['ratio']:.2f}, "
        f"paired diff CI [{comparison['difference']['low']:.4f}, {comparison['difference']['high']:.4f}]"
    )
    assert comparison["ratio"] >= 2.0
    assert comparison["difference"]["high"] < 0  # CI of mean(smooth − plain) excludes zero
    assert comparison["verdict"] == "smoothquant+ffn_down is better"
    verdicts = {c["metric"]: c["verdict"] for c in report["comparisons"]}
    assert verdicts["psnr"] == verdicts["ssim"] == "smoothquant+ffn_down is better"  # decoded images agree


def sample_with(comfy, nodes: dict, model_ref: list, seed: int = 3) -> torch.Tensor:
    return sample_latent(comfy, nodes, model_ref, seed=seed, steps=3, spec=SPEC)


@pytest.mark.parametrize("fold", ["off", "where exact"])
def test_save_load_of_smoothquant_model_is_bit_exact(comfy, outlier_model, fold):
    name = f"tiny_sq_{fold.replace(' ', '_')}"
    nodes = model_nodes(outlier_model, protection="ffn_down+attn_out", fold=fold)
    nodes["write"] = {
        "class_type": "SaveInt8Model",
        "inputs": {"model": ["smooth", 0], "filename": name, "overwrite": True},
    }
    in_memory = sample_with(comfy, nodes, ["smooth", 0])
    path = comfy.diffusion_models_dir / f"{name}.safetensors"
    state_dict, recipe = comfy.module("quant.int8_checkpoint").load_int8_checkpoint(path)
    smoothed = recipe["smoothquant"]["smoothed_layers"]
    assert all(state_dict[f"{layer}.smooth"].dtype == torch.float32 for layer in smoothed)
    if fold == "where exact":  # every quantized qkv/fc1 reads a modulated input: folded, no vector needed
        assert recipe["smoothquant"]["folded_sites"] and not any(".qkv" in s or ".fc1" in s for s in smoothed)
    else:
        assert "joint_blocks.0.x_block.attn.qkv" in smoothed
    assert "joint_blocks.0.x_block.mlp.fc2" in recipe["protected_layers"]
    assert "joint_blocks.0.x_block.attn.proj" in recipe["protected_layers"]
    assert recipe["calibration"]["prompts"] == 4 and recipe["smoothquant"]["alpha"] == 0.5

    (loaded,) = comfy.run_node("LoadInt8DiffusionModel", unet_name=path.name)
    for key, tensor in loaded.model.diffusion_model.state_dict().items():
        assert torch.equal(tensor, state_dict[key]), key
    reloaded = sample_with(
        comfy,
        {"reload": {"class_type": "LoadInt8DiffusionModel", "inputs": {"unet_name": path.name}}},
        ["reload", 0],
    )
    assert torch.equal(reloaded, in_memory)


def test_folding_keeps_the_float_model_function(comfy, outlier_model):
    """Folding changes no computation in exact arithmetic: ComfyUI's own fp32 MMDiT gives the same output
    before and after every fold site of its blocks is folded (s from recorded statistics, α = 0.5)."""
    from comfy_harness import build_tiny_model

    sq = comfy.module("quant.smoothquant")
    calibration = comfy.module("quant.calibration")
    model = build_tiny_model(SPEC, seed=1, dtype=torch.float32)
    stats = calibration.ActivationStats()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([0.7, 0.7])
    context = torch.randn(2, 8, SPEC.context_dim, generator=g)
    y = torch.randn(2, SPEC.pooled_dim, generator=g)
    with torch.no_grad(), calibration.ActivationRecorder(model, stats):
        before = model(x, t, y=y, context=context)
    state = model.state_dict()
    names = [k[: -len(".weight")] for k, v in state.items() if v.ndim == 2 and k.startswith("joint_blocks")]
    plan = sq.plan_smoothquant(
        names, state.__getitem__, {k: v.shape for k, v in state.items()}, stats, alpha=0.5, fold=True
    )
    # block 0: qkv and fc1 of both streams; block 1: x_block qkv and fc1, pre-only context block qkv
    assert len(plan.folded) == 7
    folded = {target for site in plan.folded for target in site.targets}
    assert (
        not folded & set(plan.smooth) and "joint_blocks.0.x_block.mlp.fc2" in plan.smooth
    )  # fc2: not foldable
    model.load_state_dict({**state, **plan.replaced})
    with torch.no_grad():
        after = model(x, t, y=y, context=context)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smoothquant_checkpoint(comfy, outlier_model):
    nodes = model_nodes(outlier_model)
    nodes["write"] = {
        "class_type": "SaveInt8Model",
        "inputs": {"model": ["smooth", 0], "filename": "tiny_sq_for_damage", "overwrite": True},
    }
    del nodes["plain"]
    comfy.run(nodes)
    path = comfy.diffusion_models_dir / "tiny_sq_for_damage.safetensors"
    return comfy.module("quant.int8_checkpoint").load_int8_checkpoint(path)


def _write_damaged(comfy, name: str, state_dict: dict, recipe: dict) -> str:
    from safetensors.torch import save_file

    checkpoint = comfy.module("quant.int8_checkpoint")
    save_file(
        state_dict,
        str(comfy.diffusion_models_dir / name),
        metadata={checkpoint.RECIPE_KEY: json.dumps(recipe)},
    )
    return name


def test_checkpoint_with_inconsistent_smoothing_vector_fails_clearly(comfy, smoothquant_checkpoint):
    state_dict, recipe = smoothquant_checkpoint
    layer = "joint_blocks.0.x_block.attn.qkv"
    damaged = dict(state_dict, **{f"{layer}.smooth": state_dict[f"{layer}.smooth"][:-1].contiguous()})
    name = _write_damaged(comfy, "tiny_sq_bad_shape.safetensors", damaged, recipe)
    with pytest.raises(ValueError, match=rf"{layer}\.smooth must be fp32 \[128\]"):
        comfy.run_node("LoadInt8DiffusionModel", unet_name=name)


def test_checkpoint_missing_a_smoothing_vector_fails_clearly(comfy, smoothquant_checkpoint):
    state_dict, recipe = smoothquant_checkpoint
    layer = "joint_blocks.0.x_block.attn.qkv"
    damaged = {k: v for k, v in state_dict.items() if k != f"{layer}.smooth"}
    name = _write_damaged(comfy, "tiny_sq_missing.safetensors", damaged, recipe)
    with pytest.raises(ValueError, match=rf"{layer}.*smooth"):
        comfy.run_node("LoadInt8DiffusionModel", unet_name=name)


def sensitivity_graph(unet_name: str, granularity: str, fraction: float, with_calibration: bool) -> dict:
    nodes = model_nodes(unet_name)
    del nodes["plain"], nodes["smooth"]
    nodes["sens"] = {
        "class_type": "QuantizationSensitivity",
        "inputs": {
            "model": ["load", 0],
            **sampling_inputs(EVAL_PROMPTS, num_prompts=1, steps=2, seed=1),
            "granularity": granularity,
            "protect_fraction": fraction,
        },
    }
    if with_calibration:
        nodes["sens"]["inputs"].update({"calibration": ["calib", 0], "alpha": 0.5})
    nodes["show"] = {
        "class_type": "DiTQuantTestShowText",
        "inputs": {"report": ["sens", 0], "protect": ["sens", 2], "chart": ["sens", 1]},
    }
    return nodes


class ShowText:
    """Test-only output node exposing the sensitivity node's outputs in the execution result."""

    CATEGORY = "DiT Quant/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "report": ("STRING", {"forceInput": True}),
                "protect": ("STRING", {"forceInput": True}),
                "chart": ("IMAGE",),
            }
        }

    def show(self, report, protect, chart):
        return {"ui": {"report": [report], "protect": [protect], "chart_shape": list(chart.shape)}}


def _rows(report: str) -> dict[str, float]:
    rows = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            rows[parts[1]] = float(parts[3])
    return rows


def test_sensitivity_node_ranks_layers_and_budgets_protection(comfy, outlier_model):
    comfy.nodes.NODE_CLASS_MAPPINGS["DiTQuantTestShowText"] = ShowText
    plain = comfy.run(sensitivity_graph(outlier_model, "layer", 0.25, with_calibration=False))["show"]
    rows = _rows(plain["report"][0])
    assert len(rows) == 17  # every quantizable Linear of the blocks: 5 + 5 + 5 + 2
    assert list(rows.values()) == sorted(rows.values(), reverse=True) and min(rows.values()) > 0
    protect = plain["protect"][0].splitlines()
    assert protect and set(protect) <= set(rows) and protect[0] == next(iter(rows))
    assert plain["chart_shape"][0] == 1 and plain["chart_shape"][3] == 3

    smoothed = _rows(
        comfy.run(sensitivity_graph(outlier_model, "layer", 0.25, with_calibration=True))["show"]["report"][0]
    )
    # the outlier-carrying inputs (qkv, fc1, proj, fc2) lose most of their error once smoothed
    assert sum(smoothed.values()) * 2 < sum(rows.values())

    blocks = _rows(
        comfy.run(sensitivity_graph(outlier_model, "block", 1.0, with_calibration=False))["show"]["report"][0]
    )
    assert set(blocks) == {"joint_blocks.0", "joint_blocks.1"}


def test_fold_only_model_exports_to_comfyui_int8_layout_and_back(comfy, outlier_model, tmp_path):
    """Smoothing only where it folds leaves no smoothing vector, so the model is exactly representable in
    ComfyUI core's per-layer INT8 layout: export → file → import gives back every tensor bit for bit.
    A model with smoothing vectors is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    checkpoint = comfy.module("quant.int8_checkpoint")
    interop = comfy.module("quant.comfy_int8_format")
    saved = {}
    for fold in ("only where exact", "off"):
        nodes = model_nodes(outlier_model, fold=fold)
        del nodes["plain"]
        name = f"tiny_sq_export_{fold.replace(' ', '_')}"
        nodes["write"] = {
            "class_type": "SaveInt8Model",
            "inputs": {"model": ["smooth", 0], "filename": name, "overwrite": True},
        }
        comfy.run(nodes)
        saved[fold] = checkpoint.load_int8_checkpoint(comfy.diffusion_models_dir / f"{name}.safetensors")

    state_dict, recipe = saved["only where exact"]
    assert recipe["smoothquant"]["folded_sites"] and not recipe["smoothquant"]["smoothed_layers"]
    exported, metadata = interop.export_comfy_int8(state_dict, recipe["quantized_layers"])
    path = tmp_path / "comfy_int8.safetensors"
    save_file(exported, str(path), metadata=metadata or None)
    with safe_open(str(path), framework="pt") as f:
        back, layers = interop.read_comfy_int8({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    assert layers == sorted(recipe["quantized_layers"])
    assert set(back) == set(state_dict)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state_dict.items())

    smoothed_state, smoothed_recipe = saved["off"]
    with pytest.raises(interop.ComfyInt8FormatError, match="unfolded SmoothQuant vector"):
        interop.export_comfy_int8(smoothed_state, smoothed_recipe["quantized_layers"])
