"""Test helpers for the SmoothQuant/evaluation nodes in a real ComfyUI: a stand-in text encoder and a
tiny MMDiT with deliberately built activation outliers.

No text encoder can be had offline at any size, so ``FakeTextEncoder`` stands in for CLIP: it has the
two methods the stock CLIPTextEncode node uses (``tokenize``, ``encode_from_tokens_scheduled``) and
returns seeded random conditioning per prompt text, shaped for the tiny MMDiT.
"""

import zlib

import torch
from comfy_harness import TinyModelSpec, build_tiny_model


class FakeTextEncoder:
    def __init__(self, tokens: int, context_dim: int, pooled_dim: int) -> None:
        self.tokens, self.context_dim, self.pooled_dim = tokens, context_dim, pooled_dim

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, text: str):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
        context = torch.randn(1, self.tokens, self.context_dim, generator=g)
        extra = {"pooled_output": torch.randn(1, self.pooled_dim, generator=g)} if self.pooled_dim else {}
        return [[context, extra]]


class FakeTextEncoderNode:
    """Test-only node giving a FakeTextEncoder as CLIP."""

    CATEGORY = "DiT Quant/testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": ("INT", {"default": 8}),
                "context_dim": ("INT", {"default": 64}),
                "pooled_dim": ("INT", {"default": 32}),
            }
        }

    def make(self, tokens: int, context_dim: int, pooled_dim: int):
        return (FakeTextEncoder(tokens, context_dim, pooled_dim),)


class FakeVae:
    """Stands in for a VAE (none can be had offline): decodes a latent [B, C, h, w] to an image
    [B, 8h, 8w, 3] in [0, 1] — sigmoid of 3 fixed channel mixes, upsampled 8× — so image metrics have
    images that follow the latents."""

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        mix = torch.linspace(-1, 1, 3 * samples.shape[1]).reshape(3, samples.shape[1])
        rgb = torch.sigmoid(torch.einsum("oc,bchw->bohw", mix, samples.float()))
        return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest").permute(0, 2, 3, 1)


class FakeVaeNode:
    CATEGORY = "DiT Quant/testing"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return (FakeVae(),)


def register(comfy) -> None:
    comfy.nodes.NODE_CLASS_MAPPINGS["DiTQuantTestTextEncoder"] = FakeTextEncoderNode
    comfy.nodes.NODE_CLASS_MAPPINGS["DiTQuantTestVae"] = FakeVaeNode


def text_encoder_node(spec: TinyModelSpec) -> dict:
    return {
        "class_type": "DiTQuantTestTextEncoder",
        "inputs": {
            "tokens": spec.context_tokens,
            "context_dim": spec.context_dim,
            "pooled_dim": spec.pooled_dim,
        },
    }


def inject_outliers(
    state_dict: dict[str, torch.Tensor], hidden: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Gives the inputs of qkv, fc1, attn.proj and fc2 of every block a few channels 10–50× larger than
    the rest, as real DiT activations have (random weights have none), and divides the matching weight
    columns by the same factors so that the float model computes (nearly) what it did:

    * qkv / fc1 inputs = norm(x)·(1 + scale) + shift: the adaLN scale/shift rows of 3 channels are
      rescaled so that those channels come out f× larger (exactly), qkv/fc1 columns ÷ f.
    * attn.proj input = attention output, linear in v: 3 v rows of qkv × f, proj columns ÷ f (exact).
    * fc2 input = GELU(fc1 output): 3 hidden rows of fc1 × f, fc2 columns ÷ f (GELU is not homogeneous,
      so this one changes the function somewhat — an outlier channel with large positive values).
    """
    sd = {k: v.float().clone() for k, v in state_dict.items()}
    g = torch.Generator().manual_seed(seed)

    def outliers(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        channels = torch.randperm(count, generator=g)[:3]
        return channels, 10 + 40 * torch.rand(3, generator=g)

    blocks = sorted(
        {
            k.rsplit(".adaLN_modulation", 1)[0]
            for k in sd
            if ".adaLN_modulation.1.weight" in k and k.startswith("joint_blocks.")
        }
    )
    for block in blocks:
        mod_w, mod_b = sd[f"{block}.adaLN_modulation.1.weight"], sd[f"{block}.adaLN_modulation.1.bias"]
        chunks = mod_w.shape[0] // hidden
        targets = [(0, 1, f"{block}.attn.qkv")] + ([(3, 4, f"{block}.mlp.fc1")] if chunks == 6 else [])
        for shift, scale, layer in targets:
            channels, factors = outliers(hidden)
            for c, f in zip(channels.tolist(), factors.tolist(), strict=True):
                for row, add in ((shift * hidden + c, 0.0), (scale * hidden + c, f - 1)):
                    mod_w[row] *= f
                    mod_b[row] = mod_b[row] * f + add
                sd[f"{layer}.weight"][:, c] /= f
        if f"{block}.attn.proj.weight" in sd:
            channels, factors = outliers(hidden)
            for c, f in zip(channels.tolist(), factors.tolist(), strict=True):
                sd[f"{block}.attn.qkv.weight"][2 * hidden + c] *= f
                if f"{block}.attn.qkv.bias" in sd:
                    sd[f"{block}.attn.qkv.bias"][2 * hidden + c] *= f
                sd[f"{block}.attn.proj.weight"][:, c] /= f
        if chunks == 6:
            channels, factors = outliers(sd[f"{block}.mlp.fc1.weight"].shape[0])
            for c, f in zip(channels.tolist(), factors.tolist(), strict=True):
                sd[f"{block}.mlp.fc1.weight"][c] *= f
                sd[f"{block}.mlp.fc1.bias"][c] *= f
                sd[f"{block}.mlp.fc2.weight"][:, c] /= f
    return {k: v.to(state_dict[k].dtype) for k, v in sd.items()}


def save_outlier_mmdit(path, spec: TinyModelSpec, seed: int = 0) -> None:
    from safetensors.torch import save_file

    model = build_tiny_model(spec, seed, dtype=torch.float32)
    sd = inject_outliers(model.state_dict(), 64 * spec.depth, seed)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))


def sampling_inputs(
    prompts: list[str],
    *,
    num_prompts: int = 0,
    negative_prompt: str = "",
    size: int = 64,
    steps: int = 4,
    cfg: float = 3.0,
    seed: int = 100,
) -> dict:
    """The prompt and sampler inputs that SmoothQuantCalibrate, QualityEvaluation and
    QuantizationSensitivity share (CLIP from node "clip", euler, simple scheduler)."""
    return {
        "clip": ["clip", 0],
        "prompts": "\n".join(prompts),
        "negative_prompt": negative_prompt,
        "num_prompts": num_prompts,
        "width": size,
        "height": size,
        "steps": steps,
        "cfg": cfg,
        "sampler_name": "euler",
        "scheduler": "simple",
        "seed": seed,
    }


def apply_smoothquant_node(
    protection: str = "ffn_down",
    alpha: float = 0.5,
    alpha_search: bool = False,
    fold_smoothing: str = "off",
    extra_protected_layers: str = "",
) -> dict:
    """ApplySmoothQuant on the model of node "load" with the statistics of node "calib"."""
    return {
        "class_type": "ApplySmoothQuant",
        "inputs": {
            "model": ["load", 0],
            "calibration": ["calib", 0],
            "protection": protection,
            "alpha": alpha,
            "alpha_search": alpha_search,
            "fold_smoothing": fold_smoothing,
            "extra_protected_layers": extra_protected_layers,
        },
    }


def smoothquant_nodes(
    unet_name: str, spec: TinyModelSpec, prompts: list[str], protection: str = "ffn_down", fold: str = "off"
) -> dict:
    """API-format nodes: UNETLoader "load" → plain INT8 "plain", and SmoothQuantCalibrate "calib" over
    ``prompts`` (64×64, 4 euler steps) → ApplySmoothQuant "smooth" (α = 0.5)."""
    return {
        "load": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "clip": text_encoder_node(spec),
        "plain": {"class_type": "QuantizeModelInt8", "inputs": {"model": ["load", 0], "keep_layers": ""}},
        "calib": {
            "class_type": "SmoothQuantCalibrate",
            "inputs": {
                "model": ["load", 0],
                **sampling_inputs(prompts, num_prompts=len(prompts)),
                "timestep_buckets": 0,
                "reservoir_rows": 16,
            },
        },
        "smooth": apply_smoothquant_node(protection, fold_smoothing=fold),
    }
