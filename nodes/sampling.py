"""Running ComfyUI's real sampler from inside a node: prompt encoding, empty latents, one sampling run,
and the denoiser-call capture the sensitivity analysis replays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import torch

# Varied content, styles and compositions, including rendered text (signs, labels, typography), so that
# calibration sees the activation ranges text rendering needs as well as photographic and flat content.
DEFAULT_PROMPTS = """\
a photograph of a red fox standing in fresh snow at dawn, shallow depth of field
a neon sign above a diner door that reads "OPEN 24 HOURS", rainy night, reflections on wet asphalt
an isometric illustration of a tiny city on a floating island, pastel colors
close-up portrait of an elderly fisherman with weathered skin, dramatic side lighting
a vintage travel poster with bold letters "VISIT MARS", retro-futuristic rocket, limited palette
a bowl of ramen with a soft-boiled egg and scallions, overhead food photography
a handwritten chalkboard menu that says "Soup of the day: Tomato" in a cozy cafe
a watercolor painting of a lighthouse on a cliff during a storm
a product shot of a glass perfume bottle on black marble, studio lighting, crisp highlights
a crowded street market in Marrakech, wide angle, afternoon sun
a minimalist logo of a mountain inside a circle with the word "SUMMIT" below it, flat vector
an astronaut riding a horse across a desert, cinematic, golden hour"""

SAMPLERS = comfy.samplers.KSampler.SAMPLERS
SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS
LATENT_DOWNSCALE = 8  # spatial VAE factor of the image/video DiTs this pack targets


def nonempty_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_prompts(text: str, limit: int = 0) -> list[str]:
    """One prompt per non-empty line; the first ``limit`` (0 = all)."""
    prompts = nonempty_lines(text)
    if not prompts:
        raise ValueError("no prompts given: enter one prompt per line")
    return prompts[:limit] if limit > 0 else prompts


def encode(clip, text: str):
    """CONDITIONING for ``text``, exactly as the stock CLIPTextEncode node makes it."""
    if clip is None:
        raise RuntimeError("no CLIP/text encoder given: connect the text encoder that matches the model")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def empty_latent(model, width: int, height: int, latent: dict | None = None) -> torch.Tensor:
    """The starting latent: ``latent["samples"]`` when given, else zeros of the model's latent format
    (channels from the model; spatial size width/8 × height/8; one frame for video models)."""
    if latent is not None:
        return comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    latent_format = model.get_model_object("latent_format")
    size = [height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE]
    if latent_format.latent_dimensions == 3:
        size = [1, *size]
    elif latent_format.latent_dimensions != 2:
        raise ValueError("this model's latents are not images or video: connect a latent input")
    return torch.zeros([1, latent_format.latent_channels, *size])


def sample(
    model,
    positive,
    negative,
    latent_image: torch.Tensor,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """One full denoising run with ComfyUI's KSampler machinery (noise from ``seed`` as KSampler makes it).

    on_step(step) is called after every step; a press of ComfyUI's Cancel stops the run there.
    """

    def callback(step: int, denoised: Any, x: Any, total_steps: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if on_step is not None:
            on_step(step)

    seed &= 0xFFFF_FFFF_FFFF_FFFF  # seed + i of the last prompts may pass KSampler's maximum
    noise = comfy.sample.prepare_noise(latent_image, seed)
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


def sample_each_prompt(
    model,
    clip,
    texts: list[str],
    negative,
    latent_image: torch.Tensor,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """One :func:`sample` run per prompt (prompt i with seed + i), for what the model's wrappers observe;
    the outputs are dropped. on_step(done) is called with the steps done over all runs so far."""
    for i, text in enumerate(texts):
        sample(
            model,
            encode(clip, text),
            negative,
            latent_image,
            seed + i,
            steps,
            cfg,
            sampler_name,
            scheduler,
            on_step=None if on_step is None else lambda step, i=i: on_step(i * steps + step + 1),
        )


def schedule_sigmas(model, steps: int, sampler_name: str, scheduler: str) -> torch.Tensor:
    """The sigmas a KSampler run with these settings steps through (first = noisiest)."""
    return comfy.samplers.KSampler(
        model,
        steps=steps,
        device="cpu",
        sampler=sampler_name,
        scheduler=scheduler,
        model_options=model.model_options,
    ).sigmas


def add_apply_model_wrapper(model, key: str, wrapper: Callable[..., Any]):
    """A clone of MODEL whose denoiser calls all go through ``wrapper(executor, x, t, *args, **kwargs)``."""
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)
    return patched


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor inside plain dicts, lists and tuples; other objects are kept as is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) is dict:
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


class DenoiserCalls:
    """Records every denoiser call of sampling runs (inputs kept in CPU memory) and replays them.

    Replays call the model's ``_apply_model`` directly, bypassing wrappers, on the same inputs each time,
    so two replays differ only by what changed in the model.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def wrapper(self, executor, *args, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.calls.append(_map_tensors((args, kwargs), lambda t: t.detach().to("cpu", copy=True)))
        return executor(*args, **kwargs)

    def replay(self, model) -> list[torch.Tensor]:
        """Outputs of every recorded call on ``model`` (a ModelPatcher, loaded to its device here)."""
        comfy.model_management.load_models_gpu([model])
        device = model.load_device
        outputs = []
        with torch.no_grad():
            for args, kwargs in self.calls:
                comfy.model_management.throw_exception_if_processing_interrupted()
                args, kwargs = _map_tensors((args, kwargs), lambda t: t.to(device))
                outputs.append(model.model._apply_model(*args, **kwargs).float().cpu())
        return outputs
