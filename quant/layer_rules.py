"""Which Linear layers of a diffusion model get quantized: rules as data, first match wins.

Layer names are ComfyUI diffusion-model module paths (e.g. ``joint_blocks.0.x_block.mlp.fc2`` for
SD3/MMDiT, ``double_blocks.3.img_attn.proj`` for Flux). A rule is a regular expression searched in
the name; the first matching rule decides. Layers no rule matches are quantized if they are Linear
layers with a 2-D weight large enough to benefit.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRule:
    """``pattern`` (regex, searched in the layer name) → quantize or keep in the compute dtype."""

    pattern: str
    quantize: bool
    reason: str


# Input embedders, timestep/guidance/text-pooled embedders and output layers are small and
# disproportionately sensitive; every published W8A8 DiT recipe keeps them in high precision.
DEFAULT_RULES: tuple[LayerRule, ...] = (
    LayerRule(
        r"(^|\.)(x_embedder|t_embedder|y_embedder|context_embedder|pos_embed)(\.|$)", False, "embedder"
    ),
    LayerRule(
        r"(^|\.)(img_in|txt_in|time_in|vector_in|guidance_in|time_text_embed)(\.|$)", False, "embedder"
    ),
    LayerRule(
        r"(^|\.)(patch_embedding|text_embedding|time_embedding|time_projection|img_emb)(\.|$)",
        False,
        "embedder",
    ),
    LayerRule(
        r"(^|\.)(cap_embedder|t_embedder|caption_projection|p_embedder|pooled_text_embed)(\.|$)",
        False,
        "embedder",
    ),
    LayerRule(r"(^|\.)(final_layer|norm_out|proj_out|head|final_layer_norm)(\.|$)", False, "final layer"),
)

# Smaller layers gain nothing from INT8 (launch-bound) and lose accuracy; below this K or N keep them.
MIN_FEATURES = 32


def should_quantize(
    name: str, in_features: int, out_features: int, rules: Iterable[LayerRule] = DEFAULT_RULES
) -> tuple[bool, str]:
    """Decides one Linear layer; returns (quantize?, reason)."""
    for rule in rules:
        if re.search(rule.pattern, name):
            return rule.quantize, rule.reason
    if min(in_features, out_features) < MIN_FEATURES:
        return False, f"smaller than {MIN_FEATURES} features"
    return True, "linear layer"


def protect_rules(names: Iterable[str], reason: str = "protected") -> tuple[LayerRule, ...]:
    """Rules that keep exactly the given layer names in the compute dtype (put them before the defaults)."""
    return tuple(LayerRule(f"^{re.escape(n)}$", False, reason) for n in names)
