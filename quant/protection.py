"""Protection presets: which fragile Linear layers stay in the compute dtype, as ``layer_rules`` data.

A preset is a tuple of ``LayerRule`` (quantize=False) placed before ``layer_rules.DEFAULT_RULES``, so
embedders and final layers stay protected under every preset. Patterns cover ComfyUI's module names of
SD3/MMDiT, Flux, Wan, Qwen-Image, Lumina2/Z-Image and HiDream (comfy/ldm/* of ComfyUI v0.3.75).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .layer_rules import DEFAULT_RULES, LayerRule, protect_rules

# FFN down-projections (the input is the wide, post-activation hidden state):
#   MMDiT  joint_blocks.N.{x,context}_block.mlp.fc2 (SwiGLU variant: mlp.w2)
#   Flux   double_blocks.N.{img,txt}_mlp.2, single_blocks.N.linear2 (attention out and MLP down fused;
#          12288 of its 15360 input channels are the MLP hidden state)
#   Wan    blocks.N.ffn.2
#   Qwen-Image  transformer_blocks.N.{img,txt}_mlp.net.2
#   Lumina2/Z-Image  layers.N.feed_forward.w2 (also noise_refiner / context_refiner)
#   HiDream  ...block.ff_i.shared_experts.w2, ...ff_i.experts.N.w2, ...ff_t.w2
FFN_DOWN = LayerRule(
    r"(\.mlp\.fc2|_mlp\.2|(^|\.)single_blocks\.\d+\.linear2|\.ffn\.2|_mlp\.net\.2|\.w2)$",
    False,
    "protected: FFN down-projection",
)

# Attention output projections:
#   MMDiT  ...attn.proj / attn2.proj      Flux  double_blocks.N.{img,txt}_attn.proj
#   Wan    blocks.N.{self,cross}_attn.o   Qwen-Image  attn.to_out.0, attn.to_add_out
#   Lumina2  attention.out                HiDream  attn1.to_out, attn1.to_out_t
ATTN_OUT = LayerRule(
    r"(\.attn2?\.proj|_attn\.proj|_attn\.o|\.to_out\.0|\.to_add_out|\.attention\.out|\.to_out(_t)?)$",
    False,
    "protected: attention output projection",
)

PRESETS: dict[str, tuple[LayerRule, ...]] = {
    "none": (),
    "ffn_down": (FFN_DOWN,),
    "ffn_down+attn_out": (FFN_DOWN, ATTN_OUT),
}
DEFAULT_PRESET = "ffn_down"


def protection_rules(preset: str = DEFAULT_PRESET, extra_layers: Iterable[str] = ()) -> tuple[LayerRule, ...]:
    """Layer rules for a preset: the named ``extra_layers`` (e.g. from a sensitivity budget), the
    preset's patterns, then the always-on defaults (embedders, final layers, tiny layers)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown protection preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return protect_rules(extra_layers, "protected: sensitivity budget") + PRESETS[preset] + DEFAULT_RULES


def protection_for_budget(
    ranked_layers: Sequence[str], param_counts: Mapping[str, int], fraction: float
) -> list[str]:
    """The most sensitive layers whose parameters fit in ``fraction`` of all quantizable parameters.

    ranked_layers: most sensitive first (a sensitivity report's order); param_counts: parameters of
    every quantizable layer (the budget's denominator is their sum). Walks the ranking and keeps each
    layer that still fits, so one large layer does not use up the budget of several smaller, worse ones.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"protection budget must be a fraction in [0, 1], got {fraction}")
    missing = [name for name in ranked_layers if name not in param_counts]
    if missing:
        raise ValueError(f"no parameter count for ranked layer(s): {', '.join(missing[:5])}")
    budget = fraction * sum(param_counts.values())
    chosen, used = [], 0
    for name in ranked_layers:
        if used + param_counts[name] <= budget:
            chosen.append(name)
            used += param_counts[name]
    return chosen
