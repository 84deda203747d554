"""Which GGUF type each tensor of a diffusion model gets when written, as data.

Rules, in order (the first that applies decides):
1. a tensor that is not a layer weight (``*.weight`` with 2+ dims of a Linear/Conv/Embedding) keeps a float
   type: F32 for 1-D tensors and tensors of <= 1024 values, else the source's float type (BF16/F16/F32);
2. embedders (patch/text/time/guidance inputs) and final layers (:data:`HIGH_PRECISION`) keep the source's
   float type: they are small and sensitive;
3. in an "_M" mix, sensitive layers (:data:`SENSITIVE`: FFN down-projections, attention value/qkv) go
   one step up the :data:`BUMP` ladder;
4. a row length the type cannot hold (K-quants need multiples of 256, the others of 32) falls back along
   :data:`ROW_FALLBACK` (the choices llama.cpp makes), and to the float type if nothing fits.

The architecture string written to ``general.architecture`` comes from :data:`ARCHITECTURES`: the names
the community loader accepts, detected from state-dict keys like its converter does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .gguf_types import gguf_type

SMALL_TENSOR_ELEMENTS = 1024

# (architecture, keys that must all be present); the first match wins, so more specific entries come first.
ARCHITECTURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hyvid", ("txt_in.individual_token_refiner.blocks.0.norm1.weight",)),
    ("flux", ("double_blocks.0.img_attn.proj.weight",)),
    ("sd3", ("joint_blocks.0.x_block.attn.qkv.weight",)),
    ("aura", ("double_layers.0.attn.w1q.weight",)),
    ("hidream", ("double_stream_blocks.0.block.ff_i.shared_experts.w3.weight",)),
    ("cosmos", ("blocks.0.mlp.layer1.weight", "blocks.0.adaln_modulation_cross_attn.1.weight")),
    ("ltxv", ("adaln_single.emb.timestep_embedder.linear_2.weight", "caption_projection.linear_2.weight")),
    ("wan", ("head.modulation",)),
    ("lumina2", ("cap_embedder.1.weight",)),
    ("qwen_image", ("txt_norm.weight", "img_in.weight")),
    ("sdxl", ("input_blocks.0.0.weight", "label_emb.0.0.weight")),
    ("sd1", ("input_blocks.0.0.weight",)),
)

_SEGMENT = r"(?:^|\.)"
# Embedders and final layers of the DiT families ComfyUI runs.
HIGH_PRECISION: tuple[str, ...] = tuple(
    _SEGMENT + p
    for p in (
        r"img_in\.",
        r"txt_in\.",
        r"time_in\.",
        r"vector_in\.",
        r"guidance_in\.",
        r"time_r_in\.",
        r"x_embedder\.",
        r"t_embedder\.",
        r"y_embedder\.",
        r"p_embedder\.",
        r"context_embedder\.",
        r"cap_embedder\.",
        r"time_text_embed\.",
        r"pos_embed",
        r"patch_embedding\.",
        r"text_embedding\.",
        r"time_embedding\.",
        r"time_projection\.",
        r"img_emb\.",
        r"adaln_single\.",
        r"caption_projection\.",
        r"final_layer\.",
        r"norm_out\.",
        r"proj_out\.",
        r"head\.",
        r"distilled_guidance_layer\.",
        r"label_emb\.",
        r"input_blocks\.0\.0\.",
        r"out\.2\.",
    )
)
# FFN down-projections and attention value / fused-qkv projections.
SENSITIVE: tuple[str, ...] = (
    r"\.(?:img_mlp|txt_mlp)\.(?:net\.)?2\.weight$",  # Flux / Qwen-Image FFN down
    r"single_blocks\.\d+\.linear2\.weight$",  # Flux single blocks: attention out + FFN down
    r"\.mlp\.fc2\.weight$",  # SD3 / MMDiT
    r"\.ffn\.2\.weight$",  # Wan
    r"\.feed_forward\.w2\.weight$",  # Lumina 2
    r"\.ff(?:_i|_t)?\.(?:.*\.)?w2\.weight$",  # HiDream experts
    r"\.ff(?:_context)?\.net\.2\.weight$",  # diffusers-style FFN
    r"\.(?:img_attn|txt_attn|attn|attention|self_attn)\.qkv\.weight$",
    r"\.(?:to_v|add_v_proj|v_proj)\.weight$",
    r"\.(?:self_attn|cross_attn|attn\d?)\.v\.weight$",
)

BUMP: dict[str, str] = {
    "Q2_K": "Q3_K",
    "Q3_K": "Q4_K",
    "Q4_K": "Q5_K",
    "Q5_K": "Q6_K",
    "Q6_K": "Q8_0",
    "Q4_0": "Q5_0",
    "Q4_1": "Q5_1",
    "Q5_0": "Q8_0",
    "Q5_1": "Q8_0",
}
ROW_FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

# preset name -> (base type, bump sensitive layers)
PRESETS: dict[str, tuple[str, bool]] = {
    "F32": ("F32", False),
    "F16": ("F16", False),
    "BF16": ("BF16", False),
    "Q8_0": ("Q8_0", False),
    "Q6_K": ("Q6_K", False),
    "Q5_K_M": ("Q5_K", True),
    "Q5_K": ("Q5_K", False),
    "Q5_1": ("Q5_1", False),
    "Q5_0": ("Q5_0", False),
    "Q4_K_M": ("Q4_K", True),
    "Q4_K": ("Q4_K", False),
    "Q4_1": ("Q4_1", False),
    "Q4_0": ("Q4_0", False),
    "Q3_K_M": ("Q3_K", True),
    "Q3_K": ("Q3_K", False),
    "Q2_K": ("Q2_K", False),
}


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is written: its type, the 2-D shape it is stored in when quantized (None: as is),
    and why (shown in logs and the CLI)."""

    key: str
    shape: torch.Size
    qtype: str
    stored_shape: tuple[int, ...] | None
    reason: str


def detect_architecture(keys: set[str] | list[str]) -> str:
    """The ``general.architecture`` string for a diffusion-model state dict (keys without prefix)."""
    key_set = set(keys)
    for arch, required in ARCHITECTURES:
        if all(k in key_set for k in required):
            return arch
    raise ValueError(
        "cannot tell the model family from its state-dict keys; the community GGUF loader needs "
        "one of: " + ", ".join(a for a, _ in ARCHITECTURES) + " (pass the architecture explicitly)"
    )


def float_type_for(dtype: torch.dtype | None) -> str:
    """The float GGUF type that holds values of ``dtype`` losslessly (fp8 fits in BF16)."""
    if dtype == torch.bfloat16 or (dtype is not None and dtype.itemsize == 1 and dtype.is_floating_point):
        return "BF16"
    if dtype == torch.float16:
        return "F16"
    return "F32"


def _fits(qtype: str, row: int) -> bool:
    return row % gguf_type(qtype).block_size == 0


def plan_tensor(
    key: str, shape: torch.Size, source_dtype: torch.dtype | None, preset: str, layer_weight: bool
) -> TensorPlan:
    """Decide the type of one tensor (see the module docstring for the rules).

    ``source_dtype``: the float dtype of the source (None for an already-quantized source: BF16 is kept);
    ``layer_weight``: True if the tensor is the weight of a Linear/Conv/Embedding layer.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown GGUF preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base, bump = PRESETS[preset]
    shape = torch.Size(shape)
    keep = float_type_for(source_dtype if source_dtype is not None else torch.bfloat16)
    if len(shape) <= 1 or shape.numel() <= SMALL_TENSOR_ELEMENTS:
        return TensorPlan(key, shape, "F32", None, "1-D or small")
    if not gguf_type(base).quantized:
        return TensorPlan(key, shape, base, None, "preset")
    if not layer_weight:
        return TensorPlan(key, shape, keep, None, "not a layer weight")
    if any(re.search(p, key) for p in HIGH_PRECISION):
        return TensorPlan(key, shape, keep, None, "embedder or final layer")
    qtype, reason = base, "preset"
    if bump and any(re.search(p, key) for p in SENSITIVE):
        qtype, reason = BUMP.get(base, base), "sensitive layer, one type up"
    row = math.prod(shape[1:])
    while not _fits(qtype, row):
        if qtype not in ROW_FALLBACK:
            return TensorPlan(key, shape, keep, None, f"rows of {row} fit no block size")
        qtype, reason = ROW_FALLBACK[qtype], f"rows of {row} are not whole {qtype} blocks"
    return TensorPlan(key, shape, qtype, (shape[0], row), reason)
