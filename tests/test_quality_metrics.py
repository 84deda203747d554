"""Quality metrics against direct float64 implementations and known properties; bootstrap CIs; reports."""

import json
import math

import numpy as np
import pytest
import torch
from dit_quant.quant.quality import (
    PSNR_CAP_DB,
    bootstrap_mean_ci,
    evaluate_quality,
    gaussian_window,
    latent_relative_error,
    paired_bootstrap_ci,
    psnr,
    ssim,
)


def _images(b=2, h=24, w=20, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g)


def _ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of one [H, W, C] image pair by explicit loops over every valid 11×11 window (float64)."""
    g = gaussian_window().numpy()
    window = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    h, w, channels = x.shape
    values = []
    for ch in range(channels):
        for i in range(h - 10):
            for j in range(w - 10):
                px, py = x[i : i + 11, j : j + 11, ch], y[i : i + 11, j : j + 11, ch]
                mx, my = (window * px).sum(), (window * py).sum()
                vx = (window * (px - mx) ** 2).sum()
                vy = (window * (py - my) ** 2).sum()
                cov = (window * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_gaussian_window():
    g = gaussian_window()
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert g[5] == g.max() and torch.allclose(g, g.flip(0))
    assert (g[6] / g[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)))


def test_ssim_matches_direct_windowed_loops():
    a = _images(b=2, h=15, w=14, seed=1)
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    got = ssim(a, b)
    for i in range(2):
        assert got[i].item() == pytest.approx(
            _ssim_direct(a[i].double().numpy(), b[i].double().numpy()), abs=1e-12
        )


def test_ssim_properties():
    a = _images(b=3, seed=3)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64), atol=1e-12)
    b = (a + 0.05 * noise).clamp(0, 1)
    torch.testing.assert_close(ssim(a, b), ssim(b, a))  # symmetric
    levels = [ssim(a, (a + s * noise).clamp(0, 1)).mean().item() for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(x > y for x, y in zip(levels, levels[1:], strict=False)) and -1 <= levels[-1] < 1
    # A brightness shift keeps structure: at equal MSE it scores far higher than noise (Wang et al. 2004).
    shifted = a * 0.8 + 0.1 + 0.05
    matched_noise = a * 0.8 + 0.1 + noise * ((shifted - (a * 0.8 + 0.1)) ** 2).mean().sqrt()
    base = a * 0.8 + 0.1
    assert psnr(shifted, base).mean().item() == pytest.approx(
        psnr(matched_noise, base).mean().item(), abs=0.2
    )
    dissimilarity_shift = 1 - ssim(shifted, base).mean()
    assert 1 - ssim(matched_noise, base).mean() > 3 * dissimilarity_shift  # measured: 0.024 vs 0.0048
    with pytest.raises(ValueError, match="11×11"):
        ssim(a[:, :10], a[:, :10])


def test_psnr_known_values():
    a = _images(seed=5) * 0.5 + 0.25
    assert psnr(a + 0.05, a).tolist() == pytest.approx(
        [10 * math.log10(1 / 0.0025)] * 2, abs=1e-4
    )  # 26.02 dB
    assert psnr(a, a).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    assert psnr(a * 255 + 10, a * 255, data_range=255.0).tolist() == pytest.approx(
        [10 * math.log10(255**2 / 100)] * 2
    )
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        psnr(a[0], a[0])


def test_latent_relative_error_per_sample():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(3, 4, 5, 5, generator=g)
    noisy = ref + torch.randn(ref.shape, generator=g) * torch.tensor([0.0, 0.1, 0.5]).view(3, 1, 1, 1)
    got = latent_relative_error(noisy, ref)
    for i in range(3):
        diff = noisy[i].double().numpy() - ref[i].double().numpy()
        expected = np.linalg.norm(diff) / np.linalg.norm(ref[i].double().numpy())
        assert got[i].item() == pytest.approx(expected, rel=1e-12)
    assert got[0] == 0 and got[1] < got[2]


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).normal(2.0, 1.0, 40)
    ci = bootstrap_mean_ci(values, n_boot=2000, seed=3)
    assert ci == bootstrap_mean_ci(values, n_boot=2000, seed=3)
    assert ci.low < ci.mean < ci.high and ci.mean == pytest.approx(values.mean())
    assert ci.high - ci.low == pytest.approx(2 * 1.96 * values.std(ddof=1) / math.sqrt(40), rel=0.2)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([1.0, math.inf])


def test_bootstrap_coverage_is_near_nominal():
    rng = np.random.default_rng(1)
    covered = sum(
        bootstrap_mean_ci(rng.normal(0.0, 1.0, 30), n_boot=1000, seed=t).excludes_zero() is False
        for t in range(200)
    )
    assert 0.88 <= covered / 200 <= 0.99  # percentile bootstrap at n=30 is slightly liberal; nominal 0.95


def test_paired_bootstrap_detects_paired_improvement():
    rng = np.random.default_rng(2)
    per_prompt = rng.uniform(0.5, 2.0, 12)  # large between-sample spread...
    baseline = per_prompt * 0.10
    better = per_prompt * 0.04 + rng.normal(0, 0.001, 12)  # ...but a consistent paired improvement
    ci = paired_bootstrap_ci(better, baseline, n_boot=5000, seed=0)
    assert ci.excludes_zero() and ci.high < 0
    assert ci.mean == pytest.approx((better - baseline).mean())
    same = paired_bootstrap_ci(baseline + rng.normal(0, 0.01, 12), baseline, n_boot=5000, seed=0)
    assert not same.excludes_zero()
    with pytest.raises(ValueError, match="count"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_evaluate_quality_report():
    g = torch.Generator().manual_seed(7)
    ref_lat = torch.randn(8, 4, 6, 6, generator=g)
    ref_img = torch.rand(8, 16, 16, 3, generator=g)
    lat = {
        "plain": ref_lat + 0.05 * torch.randn(ref_lat.shape, generator=g),
        "smooth": ref_lat + 0.02 * torch.randn(ref_lat.shape, generator=g),
    }
    img = {
        "plain": (ref_img + 0.05 * torch.randn(ref_img.shape, generator=g)).clamp(0, 1),
        "smooth": (ref_img + 0.02 * torch.randn(ref_img.shape, generator=g)).clamp(0, 1),
    }
    report = evaluate_quality(
        ref_lat, lat, ref_img, img, comparisons=[("smooth", "plain")], n_boot=2000, seed=1
    )
    assert set(report.metrics["smooth"]) == {"latent_rel_error", "psnr", "ssim"}
    np.testing.assert_allclose(
        report.metrics["plain"]["latent_rel_error"], latent_relative_error(lat["plain"], ref_lat).numpy()
    )
    by_metric = {c.metric: c for c in report.comparisons}
    assert set(by_metric) == {"latent_rel_error", "psnr", "ssim"}
    assert all(c.verdict() == "smooth is better" for c in by_metric.values())
    assert by_metric["latent_rel_error"].ratio == pytest.approx(2.5, rel=0.1)  # 0.05 / 0.02 noise
    text = report.text()
    assert "smooth − plain (latent_rel_error)" in text and "smooth is better" in text
    json.dumps(report.to_dict())  # serializable as is
    image = report.plot()
    assert image.shape[0] == 1 and image.shape[3] == 3 and 0 <= image.min() and image.max() <= 1
    with pytest.raises(ValueError, match="unknown variant"):
        evaluate_quality(ref_lat, lat, comparisons=[("smooth", "fp8")])


def test_latent_only_report_has_no_image_metrics():
    ref = torch.randn(4, 2, 3, 3)
    report = evaluate_quality(ref, {"q": ref * 1.01}, n_boot=200)
    assert set(report.metrics["q"]) == {"latent_rel_error"}
    assert report.metrics["q"]["latent_rel_error"] == pytest.approx(np.full(4, 0.01), rel=1e-5)
    assert report.plot().shape[1] > 0


def test_clip_scores_with_a_tiny_local_clip(tmp_path):
    """A random-weight CLIP saved locally (no download): scores equal a direct computation with the
    same model, lie in [0, 100], and a missing folder fails clearly."""
    import pathlib

    transformers = pytest.importorskip("transformers", reason="CLIP scores need transformers")
    tokenizer_dir = (
        pathlib.Path(__file__).resolve().parent.parent / ".cache" / "ComfyUI" / "comfy" / "sd1_tokenizer"
    )
    if not tokenizer_dir.is_dir():
        pytest.skip("needs ComfyUI's bundled CLIP tokenizer files (scripts/setup.sh)")
    from dit_quant.quant.quality import clip_scores

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = transformers.CLIPModel(config)
    with torch.no_grad():  # positive embeddings, so cosines are > 0 and the scores are not clamped to 0
        model.vision_model.post_layernorm.bias.fill_(3.0)
        model.text_model.final_layer_norm.bias.fill_(3.0)
        model.visual_projection.weight.abs_()
        model.text_projection.weight.abs_()
    model.save_pretrained(tmp_path)
    transformers.CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt")
    ).save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path)
    images = _images(b=3, h=40, w=36, seed=8)
    captions = ["a red fox", "a neon sign", "a bowl of soup"]
    scores = clip_scores({"a": images, "b": images.flip(1)}, captions, str(tmp_path))

    model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path)
    inputs = processor(
        text=captions,
        images=[(i * 255).round().to(torch.uint8).numpy() for i in images],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    direct = 100 * torch.nn.functional.cosine_similarity(
        out.image_embeds.double(), out.text_embeds.double()
    ).clamp(min=0)
    np.testing.assert_allclose(scores["a"], direct.numpy(), rtol=1e-5, atol=1e-6)
    assert scores["a"].shape == (3,) and np.all((scores["a"] > 0) & (scores["a"] <= 100))
    assert not np.allclose(scores["a"], scores["b"])  # each set is scored on its own images
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_scores({"a": images}, captions, str(tmp_path / "nowhere"))
