"""SmoothQuant for W8A8 Linear layers: smoothing factors, per-layer α search, exact folding.

A Linear y = x Wᵀ is rewritten as y = (x / s)(W · s)ᵀ with one factor s_k per input channel, which moves
quantization difficulty from activation outlier channels into the weights (Xiao et al., "SmoothQuant",
ICML 2023). ``Int8Linear`` divides by s inside its per-token activation quantization (no extra pass);
where the layer's input comes out of an affine per-channel operation, 1/s can instead be folded into
that operation exactly (``find_fold_sites`` / ``fold_smoothing``) and the layer needs no vector at run time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..kernels.w8a8_reference import w8a8_linear_reference
from .calibration import ActivationStats
from .int8_weights import quantize_weight_per_channel

DEFAULT_ALPHA = 0.5
ALPHA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))  # 0.00, 0.05, ..., 1.00
SMOOTH_MIN, SMOOTH_MAX = 1e-5, 1e5
PROXY_ROWS = 32


# ---------------------------------------------------------------------------------------- factors
def weight_input_absmax(*weights: torch.Tensor) -> torch.Tensor:
    """max |W[:, k]| per input channel over one or more weights [N_i, K] sharing K → fp32 [K]."""
    if not weights:
        raise ValueError("weight_input_absmax needs at least one weight")
    ks = {w.shape[-1] for w in weights}
    if len(ks) != 1 or any(w.ndim != 2 for w in weights):
        raise ValueError(
            f"weights must be 2-D with one common K, got shapes {[tuple(w.shape) for w in weights]}"
        )
    return torch.stack([w.detach().abs().amax(dim=0).float().cpu() for w in weights]).amax(dim=0)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_k = max|X_k|^α / max|W_k|^(1−α) → fp32 [K] (computed in float64).

    act_absmax, weight_absmax: [K] (any float dtype); alpha in [0, 1].
    Clamping: a channel whose activation or weight maximum is zero or not finite gets s = 1 (nothing to
    migrate, and a zero or infinite factor would wipe out or blow up the channel); every other factor is
    clamped to [1e-5, 1e5] so that W·s and x/s stay far inside the fp32/bf16 range.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    if act_absmax.shape != weight_absmax.shape or act_absmax.ndim != 1:
        raise ValueError(
            f"act_absmax {tuple(act_absmax.shape)} and weight_absmax {tuple(weight_absmax.shape)} "
            "must both be [K]"
        )
    a = act_absmax.detach().double().cpu()
    w = weight_absmax.detach().double().cpu().to(a.device)
    valid = torch.isfinite(a) & torch.isfinite(w) & (a > 0) & (w > 0)
    s = torch.ones_like(a)
    s[valid] = (a[valid] ** alpha / w[valid] ** (1.0 - alpha)).clamp(SMOOTH_MIN, SMOOTH_MAX)
    return s.float()


def apply_smoothing(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W · s per input channel: weight [N, K], s [K] → [N, K] in fp32 (fp64 for fp64 weights).
    Quantize this; the inputs are divided by s."""
    if weight.ndim != 2 or s.shape != (weight.shape[1],):
        raise ValueError(f"weight {tuple(weight.shape)} and smoothing vector {tuple(s.shape)} do not match")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype) * s.to(weight.device, dtype)[None, :]


# ---------------------------------------------------------------------------------------- α search
def synthetic_inputs(act_absmax: torch.Tensor, rows: int = PROXY_ROWS, seed: int = 0) -> torch.Tensor:
    """Proxy activations when no real rows were recorded → fp32 [rows, K].

    Gaussian rows, each column rescaled so that its maximum |x| equals the recorded channel maximum.
    Every row therefore carries the outlier channels at a large fraction of their maximum — the
    channel-persistent outliers DiT activations show — which slightly overstates the outliers of
    typical tokens. Non-finite maxima are treated as 0.
    """
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, act_absmax.shape[0], generator=generator, dtype=torch.float64)
    amax = torch.nan_to_num(act_absmax.detach().double().cpu(), nan=0.0, posinf=0.0)
    return (z / z.abs().amax(dim=0).clamp_min(1e-30) * amax).float()


def proxy_inputs(stats: ActivationStats, layer: str, rows: int = PROXY_ROWS, seed: int = 0) -> torch.Tensor:
    """Inputs for the α search of ``layer``: its recorded reservoir of real rows when there is one,
    otherwise ``synthetic_inputs`` built from its per-channel maxima → fp32 [R, K] on the CPU."""
    if layer not in stats.absmax:
        raise KeyError(f"no calibration statistics for layer {layer!r}")
    sample = stats.reservoir.get(layer)
    if sample is not None and sample.shape[0] > 0:
        return sample.float().cpu()
    return synthetic_inputs(stats.absmax[layer], rows, seed)


def quantized_output_error(
    weights: Sequence[torch.Tensor], x: torch.Tensor, smooth: torch.Tensor | None
) -> float:
    """Relative error ‖Q(x/s) Q(W·s)ᵀ − x Wᵀ‖_F / ‖x Wᵀ‖_F of the W8A8 product, summed over a group of
    weights [N_i, K] that share the input x [M, K]; bias is left out (it is added exactly).

    The quantized product is ``kernels.w8a8_linear_reference``: the arithmetic every backend reproduces.
    """
    weight = torch.cat([w.detach().float() for w in weights]).to(x.device)
    q, scale = quantize_weight_per_channel(weight, smooth)
    approx = w8a8_linear_reference(
        x.float(), q, scale, None, None if smooth is None else smooth.to(x.device)
    ).double()
    exact = x.double() @ weight.double().t()
    return ((approx - exact).norm() / exact.norm().clamp_min(1e-300)).item()


@dataclass
class AlphaSearchResult:
    """``alpha`` None means "no smoothing" won; ``errors`` maps "none"/"0.35"/... to relative errors."""

    alpha: float | None
    smooth: torch.Tensor | None
    errors: dict[str, float] = field(default_factory=dict)


def search_alpha(
    weights: Sequence[torch.Tensor],
    act_absmax: torch.Tensor,
    x: torch.Tensor,
    alphas: Sequence[float] = ALPHA_GRID,
    default: float = DEFAULT_ALPHA,
) -> AlphaSearchResult:
    """Grid search of α for one layer (or a group of layers sharing one input): the candidate with the
    lowest ``quantized_output_error`` on the proxy input x [M, K] wins.

    Candidates are "no smoothing" and every α of the grid. Ties go to no smoothing (no vector needed),
    then to the α closest to ``default``.
    """
    weight_absmax = weight_input_absmax(*weights)
    candidates: list[tuple[float | None, torch.Tensor | None]] = [(None, None)]
    for alpha in sorted(alphas, key=lambda a: abs(a - default)):
        candidates.append((alpha, smoothing_factors(act_absmax, weight_absmax, alpha)))
    errors = [quantized_output_error(weights, x, s) for _, s in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)  # first minimum: the tie-break order above
    alpha, smooth = candidates[best]
    labels = ["none" if a is None else f"{a:.2f}" for a, _ in candidates]
    return AlphaSearchResult(alpha, smooth, dict(zip(labels, errors, strict=True)))


# ---------------------------------------------------------------------------------------- folding
@dataclass(frozen=True)
class FoldRule:
    """Where 1/s can be folded exactly into the operation producing a layer's input.

    ``target``: regex (full match) for the consuming Linear, with a named group ``block``.
    ``source``: format string with ``{block}``: the modulation Linear (kind "modulation") or the affine
    norm (kind "norm") whose output feeds the target, possibly through x·(1 + scale) + shift.
    ``chunks`` (modulation only): number of equal chunks of the modulation output → (shift chunk or
    None, scale chunk) feeding this target; the count is read from the source's shape, so one rule
    covers a family's block variants.
    """

    target: str
    source: str
    kind: str
    chunks: Mapping[int, tuple[int | None, int]] = field(default_factory=dict)


_FLUX_DOUBLE = r"(?P<block>(.*\.)?double_blocks\.\d+)"
_MMDIT = r"(?P<block>(.*\.)?joint_blocks\.\d+\.(x_block|context_block))"
_QWEN = r"(?P<block>(.*\.)?transformer_blocks\.\d+)"
_HIDREAM = r"(?P<block>(.*\.)?(double_stream_blocks|single_stream_blocks)\.\d+\.block)"
_LUMINA = r"(?P<block>(.*\.)?(layers|noise_refiner|context_refiner)\.\d+)"

# The source op's output must feed only the targets of its rule (checked in the ComfyUI model code of
# v0.3.75, comfy/ldm/*): then scaling that output by 1/s and the targets' weights by s is exact.
FOLD_RULES: tuple[FoldRule, ...] = (
    # Flux (flux/layers.py): img_mod.lin → [shift1, scale1, gate1, shift2, scale2, gate2];
    # norm1(x)·(1+scale1)+shift1 feeds img_attn.qkv, norm2(x)·(1+scale2)+shift2 feeds img_mlp.0.
    FoldRule(_FLUX_DOUBLE + r"\.img_attn\.qkv", "{block}.img_mod.lin", "modulation", {6: (0, 1)}),
    FoldRule(_FLUX_DOUBLE + r"\.img_mlp\.0", "{block}.img_mod.lin", "modulation", {6: (3, 4)}),
    FoldRule(_FLUX_DOUBLE + r"\.txt_attn\.qkv", "{block}.txt_mod.lin", "modulation", {6: (0, 1)}),
    FoldRule(_FLUX_DOUBLE + r"\.txt_mlp\.0", "{block}.txt_mod.lin", "modulation", {6: (3, 4)}),
    # Flux single block: modulation.lin → [shift, scale, gate]; pre_norm(x)·(1+scale)+shift feeds linear1.
    FoldRule(
        r"(?P<block>(.*\.)?single_blocks\.\d+)\.linear1", "{block}.modulation.lin", "modulation", {3: (0, 1)}
    ),
    # SD3/MMDiT (mmdit.py DismantledBlock): adaLN_modulation.1 has 6 chunks (shift/scale/gate msa, mlp),
    # 2 (last context block, pre_only), 4 or 1 (scale_mod_only: no shift), 9 (x_block_self_attn, SD3.5M).
    FoldRule(
        _MMDIT + r"\.attn\.qkv",
        "{block}.adaLN_modulation.1",
        "modulation",
        {6: (0, 1), 2: (0, 1), 9: (0, 1), 4: (None, 0), 1: (None, 0)},
    ),
    FoldRule(
        _MMDIT + r"\.mlp\.fc1",
        "{block}.adaLN_modulation.1",
        "modulation",
        {6: (3, 4), 9: (3, 4), 4: (None, 2)},
    ),
    FoldRule(_MMDIT + r"\.attn2\.qkv", "{block}.adaLN_modulation.1", "modulation", {9: (6, 7)}),
    # Qwen-Image (qwen_image/model.py): img_mod.1/txt_mod.1 → [shift1, scale1, gate1, shift2, scale2, gate2];
    # the modulated stream feeds to_q/to_k/to_v (txt: add_q/k/v_proj) together, then the MLP input proj.
    FoldRule(_QWEN + r"\.attn\.(to_q|to_k|to_v)", "{block}.img_mod.1", "modulation", {6: (0, 1)}),
    FoldRule(
        _QWEN + r"\.attn\.(add_q_proj|add_k_proj|add_v_proj)", "{block}.txt_mod.1", "modulation", {6: (0, 1)}
    ),
    FoldRule(_QWEN + r"\.img_mlp\.net\.0\.proj", "{block}.img_mod.1", "modulation", {6: (3, 4)}),
    FoldRule(_QWEN + r"\.txt_mlp\.net\.0\.proj", "{block}.txt_mod.1", "modulation", {6: (3, 4)}),
    # HiDream (hidream/model.py): adaLN_modulation.1 → 12 chunks (image msa/mlp, text msa/mlp) in double
    # blocks, 6 in single blocks. The image FFN is a mixture of experts whose router reads the same input
    # through a plain weight, so only attention inputs and the text FFN fold.
    FoldRule(
        _HIDREAM + r"\.attn1\.(to_q|to_k|to_v)",
        "{block}.adaLN_modulation.1",
        "modulation",
        {12: (0, 1), 6: (0, 1)},
    ),
    FoldRule(
        _HIDREAM + r"\.attn1\.(to_q_t|to_k_t|to_v_t)",
        "{block}.adaLN_modulation.1",
        "modulation",
        {12: (6, 7)},
    ),
    FoldRule(_HIDREAM + r"\.ff_t\.(w1|w3)", "{block}.adaLN_modulation.1", "modulation", {12: (9, 10)}),
    # Lumina2 / Z-Image (lumina/model.py): RMSNorm with a weight, then ·(1+scale) (no shift).
    FoldRule(_LUMINA + r"\.attention\.qkv", "{block}.attention_norm1", "norm"),
    FoldRule(_LUMINA + r"\.feed_forward\.(w1|w3)", "{block}.ffn_norm1", "norm"),
    # Wan (wan/model.py): norm3 is an affine LayerNorm (cross_attn_norm=True) feeding cross_attn.q only.
    FoldRule(r"(?P<block>(.*\.)?blocks\.\d+)\.cross_attn\.q", "{block}.norm3", "norm"),
)


@dataclass(frozen=True)
class FoldSite:
    """Layers ``targets`` share one input produced by ``source``; one s folds into all of them."""

    targets: tuple[str, ...]
    source: str
    kind: str
    shift_chunk: int | None = None
    scale_chunk: int | None = None


def find_fold_sites(
    param_shapes: Mapping[str, Sequence[int]], rules: Sequence[FoldRule] = FOLD_RULES
) -> list[FoldSite]:
    """Fold sites of a model from its parameter names and shapes (``{k: v.shape for k, v in state_dict}``).

    A site is returned only when the source exists with the expected shape (modulation: [C·K, D] with C
    a chunk count of the rule, and a bias; norm: a weight [K]). Sites are grouped: targets that read the
    same source output (e.g. Qwen-Image's to_q/to_k/to_v) form one site and must share one s.
    """
    groups: dict[tuple[str, int | None, int | None], list[str]] = {}
    kinds: dict[str, str] = {}
    for key, shape in param_shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        layer, k = key[: -len(".weight")], shape[1]
        for rule in rules:
            match = re.fullmatch(rule.target, layer)
            if match is None:
                continue
            source = rule.source.format(block=match.group("block"))
            source_shape = param_shapes.get(f"{source}.weight")
            if rule.kind == "norm":
                if source_shape is not None and tuple(source_shape) == (k,):
                    groups.setdefault((source, None, None), []).append(layer)
                    kinds[source] = "norm"
            elif (
                source_shape is not None
                and len(source_shape) == 2
                and source_shape[0] % k == 0
                and f"{source}.bias" in param_shapes
                and source_shape[0] // k in rule.chunks
            ):
                shift, scale = rule.chunks[source_shape[0] // k]
                groups.setdefault((source, shift, scale), []).append(layer)
                kinds[source] = "modulation"
            break
    return [
        FoldSite(tuple(sorted(targets)), source, kinds[source], shift, scale)
        for (source, shift, scale), targets in sorted(groups.items(), key=lambda item: item[0][0])
    ]


def fold_into_modulation(
    weight: torch.Tensor, bias: torch.Tensor, s: torch.Tensor, scale_chunk: int, shift_chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds 1/s into an adaLN modulation Linear [C·K, D] whose chunks drive y = n·(1 + scale) + shift.

    y/s = n·(1 + scale') + shift' with scale' = (1 + scale)/s − 1 = scale/s + (1/s − 1) and shift' = shift/s,
    both affine in the Linear's output: the scale rows and bias are divided by s and the scale bias
    gains 1/s − 1; the shift rows and bias are divided by s. Returns new (weight, bias) in the input dtypes,
    computed in float64. Exact in real arithmetic. Precision note: with bf16 modulation outputs, 1 + scale'
    = (1 + scale)/s cancels when s ≫ 1 (relative error ≈ 2⁻⁸·(s − 1)); fold only when that is acceptable.
    """
    k = s.shape[0]
    if weight.ndim != 2 or weight.shape[0] % k or bias is None or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"modulation Linear weight {tuple(weight.shape)} / bias "
            f"{None if bias is None else tuple(bias.shape)} does not split into chunks of K={k}"
        )
    chunks = weight.shape[0] // k
    for index in (scale_chunk, shift_chunk):
        if index is not None and not 0 <= index < chunks:
            raise ValueError(f"chunk {index} out of range for {chunks} chunks")
    inv = 1.0 / s.double().to(weight.device)
    w, b = weight.double().clone(), bias.double().clone()
    for index in (scale_chunk, shift_chunk):
        if index is not None:
            rows = slice(index * k, (index + 1) * k)
            w[rows] *= inv[:, None]
            b[rows] *= inv
    b[scale_chunk * k : (scale_chunk + 1) * k] += inv - 1.0
    return w.to(weight.dtype), b.to(bias.dtype)


def fold_into_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Folds 1/s into an affine norm's per-channel weight [K] (and bias [K]): returns (weight/s, bias/s)."""
    if weight.shape != s.shape or (bias is not None and bias.shape != s.shape):
        raise ValueError(
            f"norm weight {tuple(weight.shape)} does not match smoothing vector {tuple(s.shape)}"
        )
    inv = 1.0 / s.double().to(weight.device)
    new_bias = None if bias is None else (bias.double() * inv).to(bias.dtype)
    return (weight.double() * inv).to(weight.dtype), new_bias


def fold_smoothing(
    site: FoldSite, s: torch.Tensor, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Exact SmoothQuant rewrite of one site: returns the replaced tensors (state-dict keys → new tensors).

    The source's output is divided by s and every target's float weight multiplied by s (in its dtype) —
    including targets kept in high precision, since they read the same input. Quantize the returned
    target weights with no smoothing vector. ``tensors`` must hold the source's and targets' tensors.
    """

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise KeyError(f"fold site {site.source}: tensor {key!r} is missing")
        return tensors[key]

    out: dict[str, torch.Tensor] = {}
    if site.kind == "modulation":
        w, b = fold_into_modulation(
            need(f"{site.source}.weight"), need(f"{site.source}.bias"), s, site.scale_chunk, site.shift_chunk
        )
        out[f"{site.source}.weight"], out[f"{site.source}.bias"] = w, b
    elif site.kind == "norm":
        w, b = fold_into_norm(need(f"{site.source}.weight"), tensors.get(f"{site.source}.bias"), s)
        out[f"{site.source}.weight"] = w
        if b is not None:
            out[f"{site.source}.bias"] = b
    else:
        raise ValueError(f"unknown fold kind {site.kind!r}")
    for target in site.targets:
        weight = need(f"{target}.weight")
        out[f"{target}.weight"] = apply_smoothing(weight, s).to(weight.dtype)
    return out


# ---------------------------------------------------------------------------------------- whole model
@dataclass
class SmoothQuantPlan:
    """How to SmoothQuant a model's quantized layers.

    ``smooth``: layer → s [K] to store in its Int8Linear (divides the activations at run time).
    ``replaced``: state-dict key → new float tensor from folding (sources' weights/biases and the
    targets' weights W·s; quantize those targets from these weights, with no smoothing vector).
    ``alphas``: layer → α used (None: no smoothing; a folded site's α is listed for each target).
    ``unseen``: quantized layers the calibration never saw (quantized without smoothing).
    """

    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float | None] = field(default_factory=dict)
    folded: list[FoldSite] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-serializable description for a checkpoint recipe."""
        return {
            "smoothed_layers": sorted(self.smooth),
            "folded_sites": [{"source": s.source, "targets": list(s.targets)} for s in self.folded],
            "layer_alpha": dict(sorted(self.alphas.items())),
            "unseen_layers": sorted(self.unseen),
        }


def plan_smoothquant(
    quantized: Sequence[str],
    tensor_of: Callable[[str], torch.Tensor],
    param_shapes: Mapping[str, Sequence[int]],
    stats: ActivationStats,
    alpha: float = DEFAULT_ALPHA,
    search: bool = False,
    fold: bool = False,
    smooth_unfoldable: bool = True,
    alphas: Sequence[float] = ALPHA_GRID,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> SmoothQuantPlan:
    """Smoothing for every layer in ``quantized`` from calibration statistics.

    tensor_of(key): the float tensor of a state-dict key (e.g. ``"blocks.0.ffn.0.weight"``), LoRA merged.
    param_shapes: every parameter's shape (to find fold sites). alpha: the fixed α, or the default the
    search prefers on ties when ``search`` is on (grid ``alphas``, proxy inputs from ``proxy_inputs``).
    fold: fold s into the preceding modulation/norm where ``find_fold_sites`` allows it (only sites with
    a quantized target); other layers keep s in their Int8Linear, or, with ``smooth_unfoldable`` off, are
    not smoothed at all (the model then needs no smoothing vector: exportable to ComfyUI's INT8 layout).
    device: where the α search runs.
    """
    plan = SmoothQuantPlan()
    to_quantize = set(quantized)
    sites = [s for s in find_fold_sites(param_shapes) if to_quantize & set(s.targets)] if fold else []
    folded_targets = {t for s in sites for t in s.targets}
    unfolded = [(n,) for n in quantized if n not in folded_targets] if smooth_unfoldable else []
    units: list[tuple[str, ...] | FoldSite] = [*sites, *unfolded]

    def plan_unit(unit: tuple[str, ...] | FoldSite) -> None:
        layers = unit.targets if isinstance(unit, FoldSite) else unit
        seen = [layer for layer in layers if layer in stats.absmax]
        if not seen:
            plan.unseen.extend(layer for layer in layers if layer in to_quantize)
            return
        weights = [tensor_of(f"{layer}.weight") for layer in layers]
        for layer in seen:
            if stats.absmax[layer].shape[0] != weights[0].shape[1]:
                raise ValueError(
                    f"layer {layer}: the calibration saw {stats.absmax[layer].shape[0]} input channels, "
                    f"the model's weight has {weights[0].shape[1]} (recorded on another model?)"
                )
        act_absmax = torch.stack([stats.absmax[layer].float().cpu() for layer in seen]).amax(dim=0)
        if search:
            x = proxy_inputs(stats, seen[0]).to(device)
            result = search_alpha([w.to(device) for w in weights], act_absmax, x, alphas, default=alpha)
            chosen, s = result.alpha, result.smooth
        else:
            chosen, s = alpha, smoothing_factors(act_absmax, weight_input_absmax(*weights), alpha)
        plan.alphas.update({layer: chosen for layer in layers if layer in to_quantize})
        if s is None:
            return
        if isinstance(unit, FoldSite):
            keys = [f"{unit.source}.weight", f"{unit.source}.bias"] + [f"{t}.weight" for t in unit.targets]
            # a source feeding several sites (e.g. the attention and MLP chunks) folds them one after another
            tensors = {
                k: plan.replaced[k] if k in plan.replaced else tensor_of(k) for k in keys if k in param_shapes
            }
            plan.replaced.update(fold_smoothing(unit, s, tensors))
            plan.folded.append(unit)
        else:
            plan.smooth[layers[0]] = s

    for i, unit in enumerate(units):
        plan_unit(unit)
        if progress is not None:
            progress(i + 1, len(units))
    return plan
