"""Quality evaluation node: reference vs quantized models on the same prompts and seeds, with CIs."""

from __future__ import annotations

import json
import logging

import comfy.utils
import torch

from ..quant.quality import clip_scores, evaluate_quality
from .sampling import DEFAULT_PROMPTS, SAMPLERS, SCHEDULERS, empty_latent, encode, parse_prompts, sample

CATEGORY = "DiT Quant/Evaluation"
REPORT_UI_KEY = "dit_quant_quality"


class QualityEvaluation:
    DISPLAY_NAME = "Quantization Quality Evaluation"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Samples every prompt × seed with the reference model and one or two quantized variants "
        "(identical noise and settings) and reports per-sample latent relative error, image PSNR and "
        "SSIM (with a VAE), optional CLIP scores, means with bootstrap 95% CIs and a paired bootstrap "
        "CI of the difference between the two variants."
    )
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "plot")
    OUTPUT_TOOLTIPS = (
        "The report as text (the JSON form is in the node's UI output).",
        "Bar charts of the metric means with 95% CIs.",
    )
    OUTPUT_NODE = True
    FUNCTION = "evaluate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference_model": ("MODEL", {"tooltip": "The unquantized model (bf16/fp16)."}),
                "variant_a": ("MODEL", {"tooltip": "A quantized model, e.g. from 'Apply SmoothQuant'."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that belongs to the models."}),
                "prompts": (
                    "STRING",
                    {"default": DEFAULT_PROMPTS, "multiline": True, "tooltip": "One prompt per line."},
                ),
                "negative_prompt": (
                    "STRING",
                    {"default": "", "multiline": True, "tooltip": "Negative prompt."},
                ),
                "num_prompts": (
                    "INT",
                    {"default": 4, "min": 0, "max": 1000, "tooltip": "First N prompts (0 = all)."},
                ),
                "seeds_per_prompt": (
                    "INT",
                    {
                        "default": 2,
                        "min": 1,
                        "max": 100,
                        "tooltip": "Seeds per prompt: seed, seed+1, ... (samples = prompts × seeds).",
                    },
                ),
                "seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "First seed."},
                ),
                "width": (
                    "INT",
                    {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip": "Image width."},
                ),
                "height": (
                    "INT",
                    {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip": "Image height."},
                ),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
                "cfg": (
                    "FLOAT",
                    {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "CFG scale."},
                ),
                "sampler_name": (SAMPLERS, {"default": "euler", "tooltip": "Sampler, as in KSampler."}),
                "scheduler": (SCHEDULERS, {"default": "simple", "tooltip": "Scheduler, as in KSampler."}),
                "n_boot": (
                    "INT",
                    {
                        "default": 10000,
                        "min": 100,
                        "max": 1000000,
                        "tooltip": "Bootstrap resamples for the confidence intervals.",
                    },
                ),
                "variant_a_name": ("STRING", {"default": "variant A", "tooltip": "Label of variant A."}),
                "variant_b_name": ("STRING", {"default": "variant B", "tooltip": "Label of variant B."}),
            },
            "optional": {
                "variant_b": (
                    "MODEL",
                    {"tooltip": "A second quantized model; A − B is tested with a paired CI."},
                ),
                "vae": ("VAE", {"tooltip": "Decode latents to images for PSNR, SSIM and CLIP scores."}),
                "clip_model_path": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Local folder of a Hugging Face CLIP model for CLIP "
                        "scores (needs a VAE); empty = skip.",
                    },
                ),
                "latent": ("LATENT", {"tooltip": "Optional starting latent; overrides width and height."}),
            },
        }

    def evaluate(
        self,
        reference_model,
        variant_a,
        clip,
        prompts,
        negative_prompt,
        num_prompts,
        seeds_per_prompt,
        seed,
        width,
        height,
        steps,
        cfg,
        sampler_name,
        scheduler,
        n_boot,
        variant_a_name,
        variant_b_name,
        variant_b=None,
        vae=None,
        clip_model_path="",
        latent=None,
    ):
        texts = parse_prompts(prompts, num_prompts)
        models = {"reference": reference_model, variant_a_name: variant_a}
        if variant_b is not None:
            models[variant_b_name] = variant_b
        if len(models) != 2 + (variant_b is not None):
            raise ValueError("the variant names must differ from each other and from 'reference'")
        latent_image = empty_latent(reference_model, width, height, latent)
        negative = encode(clip, negative_prompt)
        runs = [(text, seed + j) for text in texts for j in range(seeds_per_prompt)]
        bar = comfy.utils.ProgressBar(len(runs) * len(models) * steps)
        positives = {text: encode(clip, text) for text in texts}
        stacked: dict[str, torch.Tensor] = {}
        for m, (name, model) in enumerate(models.items()):  # one model at a time: no reloading per sample
            outputs = []
            for r, (text, run_seed) in enumerate(runs):
                done = (m * len(runs) + r) * steps
                outputs.append(
                    sample(
                        model,
                        positives[text],
                        negative,
                        latent_image,
                        run_seed,
                        steps,
                        cfg,
                        sampler_name,
                        scheduler,
                        on_step=lambda step, done=done: bar.update_absolute(done + step + 1),
                    )
                )
            stacked[name] = torch.cat(outputs)
        images = None
        if vae is not None:  # video frames are stacked vertically: one image per sample
            images = {name: _as_images(vae.decode(values), len(runs)) for name, values in stacked.items()}
        extra = {}
        if clip_model_path.strip():
            if images is None:
                raise ValueError("CLIP scores need images: connect a VAE")
            scores = clip_scores(images, [text for text, _ in runs], clip_model_path.strip())
            extra = {name: {"clip_score": values} for name, values in scores.items()}
        reference = stacked.pop("reference")
        reference_images = images.pop("reference") if images is not None else None
        comparisons = [(variant_a_name, variant_b_name)] if variant_b is not None else []
        report = evaluate_quality(
            reference,
            stacked,
            reference_images,
            images,
            sample_labels=[f"{text[:40]} | seed {s}" for text, s in runs],
            comparisons=comparisons,
            extra_metrics=extra,
            n_boot=n_boot,
            seed=seed,
        )
        text = report.text()
        logging.info("DiT Quant quality evaluation:\n%s", text)
        return {
            "ui": {"text": [text], REPORT_UI_KEY: [json.dumps(report.to_dict())]},
            "result": (text, report.plot()),
        }


def _as_images(decoded: torch.Tensor, samples: int) -> torch.Tensor:
    """VAE output [S, H, W, C] or [S, T, H, W, C] → [S, H·T, W, C] float in [0, 1]."""
    return decoded.float().reshape(samples, -1, *decoded.shape[-2:]).clamp(0, 1)


NODE_CLASSES = [QualityEvaluation]
