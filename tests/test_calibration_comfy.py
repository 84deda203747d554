"""SmoothQuant calibration in a real ComfyUI: the executor runs SmoothQuant Calibrate over 4 prompts × 4
steps, and the saved statistics equal a direct hook-based recomputation exactly."""

import pytest
import torch
from calibration_harness import (
    FakeTextEncoder,
    apply_smoothquant_node,
    register,
    sampling_inputs,
    text_encoder_node,
)
from comfy_harness import TinyModelSpec, save_tiny_model

SPEC = TinyModelSpec(depth=2)
PROMPTS = ["a red fox in snow", 'a neon sign that reads "OPEN"', "a bowl of ramen", "a lighthouse in a storm"]
STEPS, BUCKETS, SEED, CFG = 4, 4, 5, 3.0


@pytest.fixture(scope="module")
def setup(comfy):
    import folder_paths

    register(comfy)
    folder = comfy.base_dir / "models" / "dit_quant_calibration"
    folder.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("dit_quant_calibration", str(folder), is_default=True)
    path = comfy.diffusion_models_dir / "tiny_sd3_calib.safetensors"
    if not path.exists():
        save_tiny_model(path, SPEC, seed=3)
    return comfy, path, folder


def calibrate_graph(unet_name: str, filename: str) -> dict:
    return {
        "load": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "clip": text_encoder_node(SPEC),
        "calib": {
            "class_type": "SmoothQuantCalibrate",
            "inputs": {
                "model": ["load", 0],
                **sampling_inputs(
                    PROMPTS, num_prompts=4, negative_prompt="blurry", steps=STEPS, cfg=CFG, seed=SEED
                ),
                "timestep_buckets": BUCKETS,
                "reservoir_rows": 8,
            },
        },
        "save": {
            "class_type": "SaveCalibration",
            "inputs": {"calibration": ["calib", 0], "filename": filename, "overwrite": True},
        },
    }


def direct_statistics(path) -> tuple[dict, dict, dict]:
    """Per-layer input maxima (overall and per bucket) and row counts from plain forward pre-hooks on a
    separately loaded copy of the model, sampled with the same settings through comfy.sample."""
    import comfy.sample
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(path))
    diffusion_model = model.model.diffusion_model
    absmax, per_bucket, rows = {}, {}, {}
    state = {"call": 0}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            amax = x.abs().amax(dim=0).float()
            bucket = state["call"] * BUCKETS // STEPS  # euler: one denoiser call per step
            absmax[name] = amax if name not in absmax else torch.maximum(absmax[name], amax)
            key = (name, bucket)
            per_bucket[key] = amax if key not in per_bucket else torch.maximum(per_bucket[key], amax)
            rows[name] = rows.get(name, 0) + x.shape[0]

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(n))
        for n, m in diffusion_model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    count_calls = diffusion_model.register_forward_hook(
        lambda *a: state.__setitem__("call", state["call"] + 1)
    )
    encoder = FakeTextEncoder(SPEC.context_tokens, SPEC.context_dim, SPEC.pooled_dim)
    negative = encoder.encode_from_tokens_scheduled("blurry")
    latent = torch.zeros(1, 16, 8, 8)
    for i, prompt in enumerate(PROMPTS):
        state["call"] = 0
        noise = comfy.sample.prepare_noise(latent, SEED + i)
        comfy.sample.sample(
            model,
            noise,
            STEPS,
            CFG,
            "euler",
            "simple",
            encoder.encode_from_tokens_scheduled(prompt),
            negative,
            latent,
            disable_pbar=True,
            seed=SEED + i,
        )
        assert state["call"] == STEPS
    for h in handles + [count_calls]:
        h.remove()
    return absmax, per_bucket, rows


def test_calibration_through_executor_matches_direct_hooks(setup):
    comfy, path, folder = setup
    comfy.run(calibrate_graph(path.name, "tiny_calib"))
    stats = comfy.module("quant.calibration").ActivationStats.load(folder / "tiny_calib.safetensors")
    absmax, per_bucket, rows = direct_statistics(path)
    assert stats.layers() == sorted(absmax)
    assert len(absmax) == 24  # every Linear of the depth-2 MMDiT, embedders and final layer included
    for name in absmax:
        assert torch.equal(stats.absmax[name], absmax[name]), name
        assert stats.rows[name] == rows[name], name
        for bucket in range(BUCKETS):
            assert torch.equal(stats.bucket_absmax[name][bucket], per_bucket[(name, bucket)]), (name, bucket)
        assert stats.reservoir[name].shape == (8, absmax[name].shape[0])
    # 4 prompts × 4 steps × (cond + uncond) × 16 image tokens reach the x_block qkv
    assert stats.rows["joint_blocks.0.x_block.attn.qkv"] == 4 * 4 * 2 * 16
    assert (stats.prompts, stats.steps_per_prompt) == (4, 4)
    assert stats.settings["sampler"] == "euler" and stats.settings["latent_shape"] == [1, 16, 8, 8]


def test_load_calibration_node_and_summary(setup):
    comfy, path, folder = setup
    comfy.run(calibrate_graph(path.name, "tiny_calib_2"))
    stats, summary = comfy.run_node("LoadCalibration", calibration_name="tiny_calib_2.safetensors")
    assert "4 prompt(s) × 4 steps, 24 Linear layers" in summary
    assert stats.num_buckets == BUCKETS


def test_calibration_nodes_describe_their_inputs(setup):
    comfy = setup[0]
    for name in (
        "SmoothQuantCalibrate",
        "SaveCalibration",
        "LoadCalibration",
        "QuantizationSensitivity",
        "ApplySmoothQuant",
        "QualityEvaluation",
    ):
        assert name in comfy.modules["loaded_node_classes"], name
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY.startswith("DiT Quant/") and cls.DESCRIPTION and cls.DISPLAY_NAME
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for input_name, entry in spec.get(group, {}).items():
                assert "tooltip" in entry[1], (name, input_name)


def test_calibration_is_cancellable_and_leaves_no_hooks(setup):
    import comfy.model_management as mm
    import comfy.sd

    harness, path, _ = setup
    model = comfy.sd.load_diffusion_model(str(path))
    encoder = FakeTextEncoder(SPEC.context_tokens, SPEC.context_dim, SPEC.pooled_dim)
    mm.interrupt_current_processing(True)  # what ComfyUI's Cancel button does
    with pytest.raises(mm.InterruptProcessingException):
        harness.run_node(
            "SmoothQuantCalibrate",
            model=model,
            clip=encoder,
            prompts="\n".join(PROMPTS),
            negative_prompt="",
            num_prompts=4,
            width=64,
            height=64,
            steps=STEPS,
            cfg=CFG,
            sampler_name="euler",
            scheduler="simple",
            seed=0,
            timestep_buckets=0,
            reservoir_rows=0,
        )
    assert not mm.processing_interrupted()
    assert not any(m._forward_pre_hooks for m in model.model.diffusion_model.modules())


def test_calibrate_and_apply_on_a_video_model(setup):
    """Wan 2.1 (video latents, no pooled conditioning): the same nodes work; FFN down-projections are
    protected by the default preset and every other block layer carries a smoothing vector."""
    comfy, _, folder = setup
    spec = TinyModelSpec(family="wan", depth=1)
    path = comfy.diffusion_models_dir / "tiny_wan_calib.safetensors"
    if not path.exists():
        save_tiny_model(path, spec, seed=4)
    comfy.run(
        {
            "load": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": path.name, "weight_dtype": "default"},
            },
            "clip": text_encoder_node(spec),
            "calib": {
                "class_type": "SmoothQuantCalibrate",
                "inputs": {
                    "model": ["load", 0],
                    **sampling_inputs(PROMPTS[:1], num_prompts=1, size=32, steps=2, seed=0),
                    "timestep_buckets": 2,
                    "reservoir_rows": 4,
                },
            },
            "smooth": apply_smoothquant_node("ffn_down", alpha_search=True, fold_smoothing="where exact"),
            "write": {
                "class_type": "SaveInt8Model",
                "inputs": {"model": ["smooth", 0], "filename": "tiny_wan_sq", "overwrite": True},
            },
        }
    )
    state_dict, recipe = comfy.module("quant.int8_checkpoint").load_int8_checkpoint(
        comfy.diffusion_models_dir / "tiny_wan_sq.safetensors"
    )
    assert "blocks.0.ffn.2" in recipe["protected_layers"]
    assert (
        "blocks.0.ffn.0" in recipe["quantized_layers"]
        and "blocks.0.self_attn.q" in recipe["quantized_layers"]
    )
    assert recipe["calibration"]["settings"]["latent_shape"] == [1, 16, 1, 4, 4]
    assert set(recipe["smoothquant"]["layer_alpha"]) == set(recipe["quantized_layers"])
    # cross_attn.q folds into norm3 when that norm is affine; everything else keeps a vector (or none won)
    smoothed = set(recipe["smoothquant"]["smoothed_layers"])
    unsmoothed = {k for k, v in recipe["smoothquant"]["layer_alpha"].items() if v is None}
    folded = {t for site in recipe["smoothquant"]["folded_sites"] for t in site["targets"]}
    assert smoothed | unsmoothed | folded == set(recipe["quantized_layers"])
    assert all(f"{layer}.smooth" in state_dict for layer in smoothed)
