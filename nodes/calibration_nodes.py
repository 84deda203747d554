"""SmoothQuant nodes: calibrate on real sampling runs, save/load the statistics, rank layers by
quantization sensitivity, and build the SmoothQuant INT8 model."""

from __future__ import annotations

import contextlib
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..quant.calibration import ActivationRecorder, ActivationStats, CalibrationFileError, bucket_of_fraction
from ..quant.int8_checkpoint import RECIPE_KEY, make_recipe
from ..quant.int8_linear import Int8Linear
from ..quant.layer_rules import DEFAULT_RULES
from ..quant.model_quantizer import plan_quantization, quantized_copy
from ..quant.protection import DEFAULT_PRESET, PRESETS, protection_rules
from ..quant.sensitivity import group_by_block, measure_sensitivity
from ..quant.smoothquant import DEFAULT_ALPHA, plan_smoothquant, smoothing_factors, weight_input_absmax
from .comfy_int8_ops import ComfyInt8Linear, make_int8_layer
from .comfy_model import output_path, patched_weight, release_model_weights, with_new_diffusion_model
from .int8_nodes import int8_layer_names
from .sampling import (
    DEFAULT_PROMPTS,
    SAMPLERS,
    SCHEDULERS,
    DenoiserCalls,
    add_apply_model_wrapper,
    empty_latent,
    encode,
    nonempty_lines,
    parse_prompts,
    sample_each_prompt,
    schedule_sigmas,
)

CATEGORY = "DiT Quant/SmoothQuant"
CALIBRATION = "DIT_QUANT_CALIBRATION"
CALIBRATION_FOLDER = "dit_quant_calibration"
FOLD_MODES = ("off", "where exact", "only where exact")
folder_paths.folder_names_and_paths.setdefault(
    CALIBRATION_FOLDER, ([os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)], {".safetensors"})
)


def sampling_inputs(prompt_count: int) -> dict:
    """The inputs shared by every node here that runs the sampler over a prompt list."""
    return {
        "clip": ("CLIP", {"tooltip": "The text encoder that belongs to the model."}),
        "prompts": (
            "STRING",
            {
                "default": DEFAULT_PROMPTS,
                "multiline": True,
                "tooltip": "One prompt per line. The default set varies content and style and "
                "includes rendered text.",
            },
        ),
        "negative_prompt": (
            "STRING",
            {
                "default": "",
                "multiline": True,
                "tooltip": "Negative prompt for the CFG branch (may be empty).",
            },
        ),
        "num_prompts": (
            "INT",
            {"default": prompt_count, "min": 0, "max": 1000, "tooltip": "Use the first N prompts (0 = all)."},
        ),
        "width": (
            "INT",
            {
                "default": 1024,
                "min": 16,
                "max": 8192,
                "step": 16,
                "tooltip": "Image width in pixels (latent = width / 8). Ignored when a latent is given.",
            },
        ),
        "height": (
            "INT",
            {
                "default": 1024,
                "min": 16,
                "max": 8192,
                "step": 16,
                "tooltip": "Image height in pixels (latent = height / 8). Ignored when a latent is given.",
            },
        ),
        "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps per prompt."}),
        "cfg": (
            "FLOAT",
            {
                "default": 4.0,
                "min": 0.0,
                "max": 100.0,
                "step": 0.1,
                "tooltip": "Classifier-free guidance scale (use the model's usual value).",
            },
        ),
        "sampler_name": (SAMPLERS, {"default": "euler", "tooltip": "Sampler, as in KSampler."}),
        "scheduler": (SCHEDULERS, {"default": "simple", "tooltip": "Noise schedule, as in KSampler."}),
        "seed": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 0xFFFFFFFFFFFFFFFF,
                "tooltip": "Noise seed of the first prompt; prompt i uses seed + i.",
            },
        ),
    }


LATENT_INPUT = (
    "LATENT",
    {
        "tooltip": "Optional starting latent (e.g. from an empty video latent node); "
        "overrides width and height."
    },
)


class SmoothQuantCalibrate:
    DISPLAY_NAME = "SmoothQuant Calibrate"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Runs the real sampler over calibration prompts and records, for every Linear input of the "
        "diffusion model, the per-channel absolute maximum over all steps and both CFG branches "
        "(running maxima only, plus an optional small sample of input rows for the per-layer α search)."
    )
    RETURN_TYPES = (CALIBRATION, "STRING")
    RETURN_NAMES = ("calibration", "summary")
    OUTPUT_TOOLTIPS = (
        "Calibration statistics for 'Apply SmoothQuant' (save them with 'Save Calibration').",
        "What was recorded, and the layers with the strongest outlier channels.",
    )
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "The bf16/fp16 diffusion model to calibrate (before quantizing)."},
                ),
                **sampling_inputs(8),
                "timestep_buckets": (
                    "INT",
                    {
                        "default": 4,
                        "min": 0,
                        "max": 64,
                        "tooltip": "Also keep maxima per part of the schedule (0 = off).",
                    },
                ),
                "reservoir_rows": (
                    "INT",
                    {
                        "default": 32,
                        "min": 0,
                        "max": 4096,
                        "tooltip": "Real input rows kept per layer (CPU memory: rows × K × 4 "
                        "bytes per layer) for the per-layer α search; 0 = none.",
                    },
                ),
            },
            "optional": {"latent": LATENT_INPUT},
        }

    def calibrate(
        self,
        model,
        clip,
        prompts,
        negative_prompt,
        num_prompts,
        width,
        height,
        steps,
        cfg,
        sampler_name,
        scheduler,
        seed,
        timestep_buckets,
        reservoir_rows,
        latent=None,
    ):
        texts = parse_prompts(prompts, num_prompts)
        stats = ActivationStats(num_buckets=timestep_buckets, reservoir_rows=reservoir_rows, seed=seed)
        latent_image = empty_latent(model, width, height, latent)
        negative = encode(clip, negative_prompt)
        sigmas = schedule_sigmas(model, steps, sampler_name, scheduler)
        recorder = ActivationRecorder(model.model.diffusion_model, stats)

        def set_bucket(executor, x, t, *args, **kwargs):
            if timestep_buckets:
                # the schedule position of this call: how many schedule sigmas lie above its sigma
                sigma = float(t.max())
                position = int((sigmas[:-1] > sigma * (1 + 1e-5)).sum()) / max(len(sigmas) - 1, 1)
                recorder.bucket = bucket_of_fraction(position, timestep_buckets)
            return executor(x, t, *args, **kwargs)

        patched = add_apply_model_wrapper(model, "dit_quant_calibration", set_bucket)
        bar = comfy.utils.ProgressBar(len(texts) * steps)
        with recorder:
            sample_each_prompt(
                patched,
                clip,
                texts,
                negative,
                latent_image,
                seed,
                steps,
                cfg,
                sampler_name,
                scheduler,
                on_step=bar.update_absolute,
            )
        stats.to("cpu")
        stats.prompts, stats.steps_per_prompt = len(texts), steps
        stats.settings = {
            "sampler": sampler_name,
            "scheduler": scheduler,
            "cfg": cfg,
            "seed": seed,
            "latent_shape": list(latent_image.shape),
            "negative_prompt": negative_prompt,
        }
        summary = stats.summary()
        logging.info("DiT Quant: %s", summary.splitlines()[0])
        return (stats, summary)


class SaveCalibration:
    DISPLAY_NAME = "Save Calibration"
    CATEGORY = CATEGORY
    DESCRIPTION = f"Writes calibration statistics to models/{CALIBRATION_FOLDER} as safetensors (atomically)."
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "calibration": (CALIBRATION, {"tooltip": "Statistics from 'SmoothQuant Calibrate'."}),
                "filename": (
                    "STRING",
                    {"default": "calibration", "tooltip": "File name; .safetensors is added."},
                ),
                "overwrite": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Replace an existing file of that name."},
                ),
            }
        }

    def save(self, calibration: ActivationStats, filename: str, overwrite: bool):
        path = output_path(CALIBRATION_FOLDER, filename, ".safetensors", overwrite)
        calibration.save(path)
        return {"ui": {"text": [path]}}


class LoadCalibration:
    DISPLAY_NAME = "Load Calibration"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        f"Loads calibration statistics saved by 'Save Calibration' from models/{CALIBRATION_FOLDER}."
    )
    RETURN_TYPES = (CALIBRATION, "STRING")
    RETURN_NAMES = ("calibration", "summary")
    OUTPUT_TOOLTIPS = ("The statistics.", "What they were recorded from.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "calibration_name": (
                    folder_paths.get_filename_list(CALIBRATION_FOLDER),
                    {"tooltip": f"A file in models/{CALIBRATION_FOLDER}."},
                )
            }
        }

    def load(self, calibration_name: str):
        path = folder_paths.get_full_path_or_raise(CALIBRATION_FOLDER, calibration_name)
        stats = ActivationStats.load(path)
        return (stats, stats.summary())


class ApplySmoothQuant:
    DISPLAY_NAME = "Apply SmoothQuant (INT8)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Quantizes the model to INT8 W8A8 with SmoothQuant: weights × s, activations ÷ s inside the "
        "activation quantization, s = max|X|^α / max|W|^(1−α) from the calibration. Protected layers "
        "stay in the compute dtype. Save the result with 'Save INT8 Model'."
    )
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    OUTPUT_TOOLTIPS = (
        "The INT8 model (the input model is left unchanged).",
        "What was quantized, smoothed, kept.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The same bf16/fp16 model the calibration was recorded on."}),
                "calibration": (
                    CALIBRATION,
                    {"tooltip": "From 'SmoothQuant Calibrate' or 'Load Calibration'."},
                ),
                "protection": (
                    list(PRESETS),
                    {
                        "default": DEFAULT_PRESET,
                        "tooltip": "Layers kept in high precision: none, FFN down-projections, "
                        "or down-projections + attention outputs. Embedders and "
                        "final layers are always kept.",
                    },
                ),
                "alpha": (
                    "FLOAT",
                    {
                        "default": DEFAULT_ALPHA,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "Migration strength α (0 = none to activations, 1 = all). 0.5 is the "
                        "SmoothQuant default; DiT studies report 0.3–0.5.",
                    },
                ),
                "alpha_search": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Search α per layer (0…1, step 0.05, or no smoothing) for the "
                        "lowest output error on the recorded input rows; α above "
                        "wins ties.",
                    },
                ),
                "fold_smoothing": (
                    list(FOLD_MODES),
                    {
                        "default": "off",
                        "tooltip": "off: every layer keeps its s as a vector applied in the kernel. "
                        "where exact: fold s into the preceding adaLN modulation / norm where that is "
                        "exact, vectors elsewhere. only where exact: smooth only those layers — no vector "
                        "at all, so the model exports to ComfyUI's own INT8 format. bf16 modulations "
                        "lose some precision when s ≫ 1.",
                    },
                ),
                "extra_protected_layers": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "More layers to keep in high precision, one per line "
                        "(e.g. the list from 'Quantization Sensitivity').",
                    },
                ),
            }
        }

    def apply(
        self,
        model,
        calibration: ActivationStats,
        protection,
        alpha,
        alpha_search,
        fold_smoothing,
        extra_protected_layers,
    ):
        diffusion_model = model.model.diffusion_model
        if int8_layer_names(diffusion_model):
            raise ValueError("This model already has INT8 layers; apply SmoothQuant to the original model.")
        extra = nonempty_lines(extra_protected_layers)
        names, kept = plan_quantization(diffusion_model, protection_rules(protection, extra))
        unknown = sorted(set(extra) - set(kept))
        if unknown:
            raise ValueError(
                f"extra_protected_layers names no Linear layer of this model: {', '.join(unknown[:5])}"
            )
        if not set(calibration.absmax) & set(names):
            raise CalibrationFileError(
                "the calibration has no statistics for any layer of this model "
                "(was it recorded on another model?)"
            )
        release_model_weights(model)
        tensor_of = _patched_tensors(model, diffusion_model)
        shapes = {k: tuple(v.shape) for k, v in diffusion_model.state_dict().items()}
        bar = comfy.utils.ProgressBar(2 * len(names))
        plan = plan_smoothquant(
            names,
            tensor_of,
            shapes,
            calibration,
            alpha,
            alpha_search,
            fold=fold_smoothing != "off",
            smooth_unfoldable=fold_smoothing != "only where exact",
            device=comfy.model_management.get_torch_device(),
            progress=lambda done, total: bar.update_absolute(done * len(names) // total),
        )

        def weight_of(name: str, module: torch.nn.Module) -> torch.Tensor:
            key = f"{name}.weight"
            return plan.replaced[key] if key in plan.replaced else tensor_of(key)

        new_dm = quantized_copy(
            diffusion_model,
            names,
            make_layer=make_int8_layer,
            weight_of=weight_of,
            smooth_of=plan.smooth.get,
            progress=lambda done, total: bar.update_absolute(len(names) + done),
        )
        quantized = set(names)
        for key, tensor in plan.replaced.items():  # folded float tensors (and folded biases of INT8 layers)
            module_name, param = key.rsplit(".", 1)
            if param == "weight" and module_name in quantized:
                continue
            module = new_dm.get_submodule(module_name)
            old = getattr(module, param)
            setattr(module, param, torch.nn.Parameter(tensor.to(old.device, old.dtype), requires_grad=False))
        settings = {
            "method": "SmoothQuant W8A8",
            "smoothquant": {
                "alpha": alpha,
                "alpha_search": alpha_search,
                "fold": fold_smoothing,
                **plan.summary(),
            },
            "protection": {"preset": protection, "extra_layers": extra},
            "calibration": calibration.summary_dict(),
        }
        setattr(new_dm, RECIPE_KEY, make_recipe(names, list(kept), **settings))
        new_model = with_new_diffusion_model(model, new_dm, names)
        for key in plan.replaced:  # merged into the folded tensors above
            new_model.patches.pop(f"diffusion_model.{key}", None)
        summary = (
            f"INT8: {len(names)} layers ({len(plan.smooth)} with a smoothing vector, "
            f"{len(plan.folded)} folded sites); kept in high precision: {len(kept)}; "
            f"not seen in calibration (no smoothing): {len(plan.unseen)}"
        )
        logging.info("DiT Quant: %s", summary)
        return (new_model, summary)


def _patched_tensors(model, diffusion_model):
    """tensor_of(key) → the diffusion model's float tensor at state-dict ``key`` with LoRA patches merged."""
    modules = dict(diffusion_model.named_modules())
    cache: dict[str, torch.Tensor] = {}

    def tensor_of(key: str) -> torch.Tensor:
        if key not in cache:
            module_name, param = key.rsplit(".", 1)
            cache[key] = patched_weight(model, module_name, modules[module_name], param)
        return cache[key]

    return tensor_of


class QuantizationSensitivity:
    DISPLAY_NAME = "Quantization Sensitivity"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Quantizes one layer (or one transformer block) at a time and measures the error that alone "
        "causes on the denoiser output, replaying the denoiser calls of real sampling runs. Returns a "
        "ranked report, a bar chart and the layers to protect within a parameter budget."
    )
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("report", "chart", "protected_layers")
    OUTPUT_TOOLTIPS = (
        "Ranked table: unit, parameters, relative error of the denoiser output.",
        "Bar chart of the most sensitive units.",
        "Layer names to keep in high precision (feed 'Apply SmoothQuant').",
    )
    FUNCTION = "measure"

    @classmethod
    def INPUT_TYPES(cls):
        inputs = sampling_inputs(2)
        inputs["steps"] = (
            "INT",
            {
                "default": 4,
                "min": 1,
                "max": 1000,
                "tooltip": "Sampling steps per prompt; every denoiser call is replayed per unit.",
            },
        )
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The bf16/fp16 diffusion model."}),
                **inputs,
                "granularity": (
                    ["block", "layer"],
                    {
                        "default": "block",
                        "tooltip": "Quantize one transformer block at a time (fast) "
                        "or one Linear layer at a time.",
                    },
                ),
                "protect_fraction": (
                    "FLOAT",
                    {
                        "default": 0.03,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.005,
                        "tooltip": "Parameter budget for the protection list, as a "
                        "fraction of all quantizable parameters.",
                    },
                ),
            },
            "optional": {
                "calibration": (
                    CALIBRATION,
                    {
                        "tooltip": "When given, units are quantized with SmoothQuant "
                        "(fixed α) as 'Apply SmoothQuant' would."
                    },
                ),
                "alpha": (
                    "FLOAT",
                    {
                        "default": DEFAULT_ALPHA,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "α used with a calibration.",
                    },
                ),
                "latent": LATENT_INPUT,
            },
        }

    def measure(
        self,
        model,
        clip,
        prompts,
        negative_prompt,
        num_prompts,
        width,
        height,
        steps,
        cfg,
        sampler_name,
        scheduler,
        seed,
        granularity,
        protect_fraction,
        calibration=None,
        alpha=DEFAULT_ALPHA,
        latent=None,
    ):
        texts = parse_prompts(prompts, num_prompts)
        latent_image = empty_latent(model, width, height, latent)
        negative = encode(clip, negative_prompt)
        calls = DenoiserCalls()
        recording = add_apply_model_wrapper(model, "dit_quant_sensitivity", calls.wrapper)
        sample_each_prompt(
            recording, clip, texts, negative, latent_image, seed, steps, cfg, sampler_name, scheduler
        )
        diffusion_model = model.model.diffusion_model
        names, _ = plan_quantization(diffusion_model, DEFAULT_RULES)
        modules = dict(diffusion_model.named_modules())
        units = group_by_block(names) if granularity == "block" else {name: [name] for name in names}
        bar = comfy.utils.ProgressBar(len(units))

        @contextlib.contextmanager
        def quantize_only(layers):
            originals = {name: modules[name] for name in layers}
            for name, module in originals.items():
                _swap_module(diffusion_model, name, _int8_like(module, name, calibration, alpha))
            try:
                yield
            finally:
                for name, module in originals.items():
                    _swap_module(diffusion_model, name, module)

        report = measure_sensitivity(
            units,
            {n: modules[n].weight.numel() for n in names},
            lambda: calls.replay(model),
            quantize_only,
            unit=granularity,
            progress=lambda done, total: bar.update_absolute(done, total),
        )
        protect = report.protection_for_budget(protect_fraction)
        text = (
            f"{len(calls.calls)} denoiser calls replayed per {granularity}; "
            f"protect {len(protect)} layer(s) within {protect_fraction:.1%} of the parameters.\n"
            + report.table(top=50)
        )
        return (text, report.chart(), "\n".join(protect))


def _swap_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _int8_like(
    module: torch.nn.Module, name: str, calibration: ActivationStats | None, alpha: float
) -> Int8Linear:
    """An INT8 copy of a loaded Linear, on the weight's device, computing as the model currently does
    (LoRA already merged into loaded weights, or applied through the layer's weight functions)."""
    weight = module.weight.detach()
    for fn in getattr(module, "weight_function", []):
        weight = fn(weight)
    bias = module.bias.detach() if module.bias is not None else None
    for fn in getattr(module, "bias_function", []):
        bias = fn(bias)
    smooth = None
    if calibration is not None and name in calibration.absmax:
        smooth = smoothing_factors(calibration.absmax[name], weight_input_absmax(weight), alpha).to(
            weight.device
        )
    layer = ComfyInt8Linear.from_float(weight.float(), bias, smooth)
    layer.comfy_cast_weights = getattr(module, "comfy_cast_weights", False)
    return layer


NODE_CLASSES = [
    SmoothQuantCalibrate,
    SaveCalibration,
    LoadCalibration,
    QuantizationSensitivity,
    ApplySmoothQuant,
]
