"""Quality metrics of quantized diffusion models against a reference run with identical seeds.

Per sample: latent relative error ‖a − b‖/‖b‖, image PSNR and SSIM. Across samples: means with
bootstrap 95% confidence intervals, and paired bootstrap CIs of the difference between two variants
(same prompt and seed in both, so the per-sample differences are paired). A report holds everything
as numbers (``to_dict``), as text and as a plot IMAGE.

SSIM follows Wang et al. (2004): 11×11 Gaussian window with σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)²,
L = 1 (images in [0, 1]), statistics over 'valid' window positions only (no padding), computed per RGB
channel and averaged over channels and positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .charts import bar_chart

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; capped so that means and CIs stay finite

# metric name → True when larger is better
METRICS: dict[str, bool] = {"latent_rel_error": False, "psnr": True, "ssim": True, "clip_score": True}


# ---------------------------------------------------------------------------------------- per sample
def latent_relative_error(latent: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """‖latent − reference‖₂ / ‖reference‖₂ per sample (dim 0) → float64 [B]."""
    if latent.shape != reference.shape:
        raise ValueError(
            f"latent shape {tuple(latent.shape)} differs from reference {tuple(reference.shape)}"
        )
    diff = (latent.double() - reference.double()).flatten(1).norm(dim=1)
    return diff / reference.double().flatten(1).norm(dim=1).clamp_min(1e-300)


def _check_images(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"images must both be [B, H, W, C], got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of [B, H, W, C] images in [0, data_range] → float64 [B], capped at 100 dB."""
    _check_images(image, reference)
    mse = ((image.double() - reference.double()) ** 2).flatten(1).mean(dim=1)
    value = 10.0 * torch.log10(data_range**2 / mse)
    return value.clamp(max=PSNR_CAP_DB)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian → float64 [size]; the 2-D SSIM window is its outer product."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image of [B, H, W, C] images in [0, data_range] → float64 [B] (see module docstring)."""
    _check_images(image, reference)
    if min(image.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels, got {tuple(image.shape[1:3])}"
        )
    channels = image.shape[3]
    x = image.double().permute(0, 3, 1, 2)
    y = reference.double().permute(0, 3, 1, 2).to(x.device)
    g = gaussian_window().to(x.device)
    rows = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(
            torch.nn.functional.conv2d(t, rows, groups=channels), cols, groups=channels
        )

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class BootstrapCI:
    """Mean of the values and its percentile bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


Values = Sequence[float] | np.ndarray | torch.Tensor


def _float64(values: Values) -> np.ndarray:
    """``values`` (a tensor on any device, an array or a sequence) as a flat float64 array."""
    return np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()


def bootstrap_mean_ci(
    values: Values,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapCI:
    """Percentile bootstrap CI of the mean: ``n_boot`` resamples with replacement, seeded (numpy PCG64)."""
    data = _float64(values)
    if data.size == 0 or not np.all(np.isfinite(data)):
        raise ValueError("bootstrap needs at least one value and only finite values")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot} and {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // data.size)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        means[start:stop] = data[rng.integers(0, data.size, size=(stop - start, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return BootstrapCI(float(data.mean()), float(low), float(high), int(data.size), confidence)


def paired_bootstrap_ci(
    a: Values,
    b: Values,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapCI:
    """CI of mean(a − b) for paired samples (a[i], b[i] from the same prompt and seed)."""
    a_np, b_np = _float64(a), _float64(b)
    if a_np.shape != b_np.shape:
        raise ValueError(f"paired samples differ in count: {a_np.size} and {b_np.size}")
    return bootstrap_mean_ci(a_np - b_np, n_boot, seed, confidence)


# ---------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Comparison:
    """``variant`` against ``baseline`` on one metric: CI of mean(variant − baseline) and what it means."""

    metric: str
    variant: str
    baseline: str
    difference: BootstrapCI
    ratio: float  # mean(baseline) / mean(variant) for error metrics, mean(variant) / mean(baseline) otherwise

    def verdict(self) -> str:
        if not self.difference.excludes_zero():
            return "no significant difference"
        better = (self.difference.mean > 0) == METRICS[self.metric]
        return f"{self.variant} is {'better' if better else 'worse'}"


class QualityReport:
    """Per-sample metrics of each variant, their bootstrap CIs, and paired comparisons."""

    def __init__(
        self,
        metrics: Mapping[str, Mapping[str, np.ndarray]],
        sample_labels: Sequence[str],
        comparisons: Sequence[Comparison],
        n_boot: int,
        seed: int,
    ) -> None:
        self.metrics = {variant: dict(values) for variant, values in metrics.items()}
        self.sample_labels = list(sample_labels)
        self.comparisons = list(comparisons)
        self.n_boot, self.seed = n_boot, seed
        self.means = {
            variant: {
                metric: bootstrap_mean_ci(values, n_boot, seed) for metric, values in per_metric.items()
            }
            for variant, per_metric in self.metrics.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.sample_labels,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "variants": {
                variant: {
                    metric: {"per_sample": values.tolist(), "mean": vars(self.means[variant][metric])}
                    for metric, values in per_metric.items()
                }
                for variant, per_metric in self.metrics.items()
            },
            "comparisons": [
                {
                    "metric": c.metric,
                    "variant": c.variant,
                    "baseline": c.baseline,
                    "difference": vars(c.difference),
                    "ratio": c.ratio,
                    "verdict": c.verdict(),
                }
                for c in self.comparisons
            ],
        }

    def text(self) -> str:
        """Table of means with 95% CIs per variant and metric, then the paired comparisons."""
        metric_names = [m for m in METRICS if any(m in per for per in self.metrics.values())]
        width = max(len(v) for v in self.metrics) if self.metrics else 7
        lines = [
            f"Quality vs reference over {len(self.sample_labels)} samples (bootstrap n={self.n_boot}, "
            f"seed={self.seed}); mean [95% CI]"
        ]
        lines.append(f"{'variant':<{width}}  " + "  ".join(f"{m:>32}" for m in metric_names))
        for variant, per_metric in self.means.items():
            cells = []
            for metric in metric_names:
                ci = per_metric.get(metric)
                cells.append(
                    f"{'-':>32}"
                    if ci is None
                    else f"{_fmt(ci.mean)} [{_fmt(ci.low)}, {_fmt(ci.high)}]".rjust(32)
                )
            lines.append(f"{variant:<{width}}  " + "  ".join(cells))
        for c in self.comparisons:
            d = c.difference
            lines.append(
                f"{c.variant} − {c.baseline} ({c.metric}): mean {_fmt(d.mean)} "
                f"[{_fmt(d.low)}, {_fmt(d.high)}], ratio {c.ratio:.3g} → {c.verdict()}"
            )
        return "\n".join(lines)

    def plot(self) -> torch.Tensor:
        """One bar chart per metric (means with 95% CI whiskers), stacked → IMAGE [1, H, W, 3] in [0, 1]."""
        charts = []
        variants = list(self.means)
        for metric in METRICS:
            cis = [self.means[v][metric] for v in variants if metric in self.means[v]]
            if not cis:
                continue
            names = [v for v in variants if metric in self.means[v]]
            direction = "higher is better" if METRICS[metric] else "lower is better"
            charts.append(
                bar_chart(
                    names,
                    [max(ci.mean, 0.0) for ci in cis],
                    f"{metric} ({direction}), mean ± 95% CI",
                    intervals=[(ci.low, ci.high) for ci in cis],
                    colors=list(range(len(names))),
                )
            )
        if not charts:
            raise ValueError("the report has no metrics to plot")
        return torch.cat(charts, dim=1)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def evaluate_quality(
    reference_latents: torch.Tensor,
    variant_latents: Mapping[str, torch.Tensor],
    reference_images: torch.Tensor | None = None,
    variant_images: Mapping[str, torch.Tensor] | None = None,
    sample_labels: Sequence[str] | None = None,
    comparisons: Sequence[tuple[str, str]] = (),
    extra_metrics: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
) -> QualityReport:
    """Scores each variant against the reference, sample by sample (dim 0 = prompt × seed).

    reference_latents / variant_latents[v]: [S, ...] latents; reference_images / variant_images[v]:
    optional [S, H, W, C] images in [0, 1]. comparisons: (variant, baseline) pairs to test with paired
    bootstrap CIs on every metric both have (e.g. ("smoothquant+protect", "plain W8A8")).
    extra_metrics: {variant (may be "reference"): {metric of ``METRICS``: [S] values}}, e.g. CLIP scores.
    """
    count = reference_latents.shape[0]
    labels = list(sample_labels) if sample_labels is not None else [f"sample {i}" for i in range(count)]
    if len(labels) != count:
        raise ValueError(f"{len(labels)} sample labels for {count} samples")
    metrics: dict[str, dict[str, np.ndarray]] = {}
    for variant, latents in variant_latents.items():
        metrics[variant] = {
            "latent_rel_error": latent_relative_error(latents, reference_latents).cpu().numpy()
        }
        if variant_images is not None and variant in variant_images:
            if reference_images is None:
                raise ValueError("variant images given without reference images")
            metrics[variant]["psnr"] = psnr(variant_images[variant], reference_images).cpu().numpy()
            metrics[variant]["ssim"] = ssim(variant_images[variant], reference_images).cpu().numpy()
    for variant, per_metric in (extra_metrics or {}).items():
        for metric, values in per_metric.items():
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
            array = _float64(values)
            if array.size != count:
                raise ValueError(f"{metric} of {variant}: {array.size} values for {count} samples")
            metrics.setdefault(variant, {})[metric] = array
    results = []
    for variant, baseline in comparisons:
        for name in (variant, baseline):
            if name not in metrics:
                raise ValueError(f"comparison names unknown variant {name!r}; known: {', '.join(metrics)}")
        for metric, larger_is_better in METRICS.items():
            if metric in metrics[variant] and metric in metrics[baseline]:
                a, b = metrics[variant][metric], metrics[baseline][metric]
                mean_a, mean_b = float(a.mean()), float(b.mean())
                ratio = (
                    (mean_a / mean_b if larger_is_better else mean_b / mean_a)
                    if min(mean_a, mean_b) > 0
                    else math.nan
                )
                results.append(
                    Comparison(metric, variant, baseline, paired_bootstrap_ci(a, b, n_boot, seed), ratio)
                )
    return QualityReport(metrics, labels, results, n_boot, seed)


def clip_scores(
    images: Mapping[str, torch.Tensor], captions: Sequence[str], model_path: str
) -> dict[str, np.ndarray]:
    """CLIP score per image: 100 · max(cos(image embedding, caption embedding), 0) → float64 [S] per set.

    images: {name: [S, H, W, C] in [0, 1]}, image i of every set captioned by captions[i]; model_path: a
    local Hugging Face CLIP folder (model + processor files; nothing is downloaded). Needs ``transformers``.
    """
    import os

    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"CLIP model folder {model_path!r} does not exist")
    for name, batch in images.items():
        if len(captions) != batch.shape[0]:
            raise ValueError(f"{len(captions)} captions for {batch.shape[0]} images of {name}")
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as e:
        raise RuntimeError("CLIP scores need the 'transformers' package") from e
    model = CLIPModel.from_pretrained(model_path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    text = processor(text=list(captions), return_tensors="pt", padding=True, truncation=True)
    scores = {}
    with torch.no_grad():
        text_embeds = model.get_text_features(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]
        )
        for name, batch in images.items():
            pixels = [(image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for image in batch]
            image_embeds = model.get_image_features(
                pixel_values=processor(images=pixels, return_tensors="pt")["pixel_values"]
            )
            cosine = torch.nn.functional.cosine_similarity(
                image_embeds.double(), text_embeds.double(), dim=-1
            )
            scores[name] = (100 * cosine.clamp(min=0)).numpy()
    return scores
