"""SmoothQuant math: factors against float64 formulas, error reduction on outlier inputs, α search,
and exact folding into adaLN modulation Linears and affine norms."""

import pytest
import torch
from dit_quant.kernels.w8a8_reference import w8a8_linear_reference
from dit_quant.quant.calibration import ActivationStats
from dit_quant.quant.int8_linear import Int8Linear
from dit_quant.quant.int8_weights import quantize_weight_per_channel
from dit_quant.quant.smoothquant import (
    SMOOTH_MAX,
    FoldSite,
    apply_smoothing,
    find_fold_sites,
    fold_into_modulation,
    fold_into_norm,
    fold_smoothing,
    proxy_inputs,
    quantized_output_error,
    search_alpha,
    smoothing_factors,
    synthetic_inputs,
    weight_input_absmax,
)
from dit_quant.quant.smoothquant import (
    plan_smoothquant as sq_plan,
)


def _outlier_inputs(rows=64, k=96, outliers=(5, 17, 40, 77), factor=30.0, seed=0):
    """Activations with a few input channels `factor`× larger in every token, as real DiT inputs have
    (random data has none; built in deliberately)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, list(outliers)] *= factor
    return x


def test_smoothing_factors_match_float64_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=g, dtype=torch.float64) * 40 + 0.01
    w = torch.rand(50, generator=g, dtype=torch.float64) * 0.5 + 0.001
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        s = smoothing_factors(a.float(), w.float(), alpha)
        expected = a.float().double() ** alpha / w.float().double() ** (1 - alpha)
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), expected, rtol=1e-6, atol=0)


def test_smoothing_factors_clamping():
    a = torch.tensor([0.0, 5.0, float("inf"), float("nan"), 1e30, 2.0])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0, 1e-30, 0.5])
    s = smoothing_factors(a, w, 0.5)
    assert s[:4].tolist() == [1.0, 1.0, 1.0, 1.0]  # zero or non-finite → 1
    assert s[4].item() == pytest.approx(SMOOTH_MAX)  # 1e30 would overflow; clamped
    assert s[5].item() == pytest.approx(2.0)  # sqrt(2) / sqrt(0.5)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(a, w, 1.5)
    with pytest.raises(ValueError, match=r"\[K\]"):
        smoothing_factors(a, w[:3], 0.5)


def test_smoothing_is_exact_before_quantization():
    g = torch.Generator().manual_seed(1)
    x = _outlier_inputs().double()
    weight = torch.randn(48, 96, generator=g, dtype=torch.float64)
    s = smoothing_factors(x.abs().amax(0).float(), weight_input_absmax(weight.float()), 0.5)
    smoothed = apply_smoothing(weight, s).double()
    torch.testing.assert_close((x / s.double()) @ smoothed.t(), x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_int8linear_with_smoothing_equals_reference_and_cuts_error_on_outliers():
    g = torch.Generator().manual_seed(2)
    x = _outlier_inputs(rows=128, seed=3)
    weight = torch.randn(64, 96, generator=g) / 10
    exact = x.double() @ weight.double().t()
    s = smoothing_factors(x.abs().amax(0), weight_input_absmax(weight), 0.5)
    plain, smooth = Int8Linear.from_float(weight), Int8Linear.from_float(weight, smooth=s)
    q, scale = quantize_weight_per_channel(weight, s)
    torch.testing.assert_close(smooth(x), w8a8_linear_reference(x, q, scale, None, s), rtol=0, atol=0)

    def rel(y):
        return ((y.double() - exact).norm() / exact.norm()).item()

    assert rel(smooth(x)) * 2 < rel(plain(x))  # measured: 0.63% vs 1.87% on this construction
    assert quantized_output_error([weight], x, s) == pytest.approx(rel(smooth(x)), rel=1e-6)


def test_search_alpha_picks_the_grid_minimum():
    g = torch.Generator().manual_seed(4)
    x = _outlier_inputs(seed=5)
    weights = [
        torch.randn(40, 96, generator=g) / 10,
        torch.randn(24, 96, generator=g) / 10,
    ]  # a shared-input group
    result = search_alpha(weights, x.abs().amax(0), x, alphas=(0.2, 0.5, 0.8))
    assert set(result.errors) == {"none", "0.20", "0.50", "0.80"}
    assert result.errors["none"] == pytest.approx(quantized_output_error(weights, x, None))
    best_label = min(result.errors, key=result.errors.get)
    assert best_label != "none" and result.alpha == float(best_label)
    torch.testing.assert_close(
        result.smooth, smoothing_factors(x.abs().amax(0), weight_input_absmax(*weights), result.alpha)
    )
    assert result.errors[best_label] * 2 < result.errors["none"]


def test_search_alpha_keeps_no_smoothing_when_nothing_helps():
    # Constant-magnitude inputs and weights: every α gives s ≡ const, the same quantized product as s = 1,
    # so the tie goes to "no smoothing".
    x = torch.ones(8, 16) * torch.tensor([1.0, -1.0]).repeat(8)
    weight = torch.ones(4, 16)
    result = search_alpha([weight], x.abs().amax(0), x, alphas=(0.25, 0.5))
    assert result.alpha is None and result.smooth is None


def test_proxy_inputs_use_reservoir_then_synthetic():
    stats = ActivationStats(reservoir_rows=6)
    x = _outlier_inputs(rows=20)
    stats.observe("real", x)
    sample = proxy_inputs(stats, "real")
    assert sample.shape == (6, 96) and all((x == row).all(1).any() for row in sample)

    stats_no_rows = ActivationStats()
    stats_no_rows.observe("synthetic", x)
    synthetic = proxy_inputs(stats_no_rows, "synthetic", rows=16)
    assert synthetic.shape == (16, 96)
    torch.testing.assert_close(synthetic.abs().amax(0), x.abs().amax(0))  # each column hits the recorded max
    assert torch.equal(synthetic_inputs(x.abs().amax(0), 16, seed=0), synthetic)  # seeded
    with pytest.raises(KeyError):
        proxy_inputs(stats, "unknown")


# ---------------------------------------------------------------------------------------- folding
def _modulated_input(x, vec, mod_weight, mod_bias, k, shift_chunk, scale_chunk):
    """n(x)·(1 + scale) + shift, as Flux/MMDiT compute a block's Linear input (float64)."""
    out = torch.nn.functional.silu(vec) @ mod_weight.t() + mod_bias
    chunks = out.split(k, dim=-1)
    normed = torch.nn.functional.layer_norm(x, (k,), eps=1e-6)
    shift = 0 if shift_chunk is None else chunks[shift_chunk][:, None, :]
    return normed * (1 + chunks[scale_chunk][:, None, :]) + shift, chunks


@pytest.mark.parametrize("chunks,shift_chunk,scale_chunk", [(6, 0, 1), (6, 3, 4), (3, 0, 1), (4, None, 2)])
def test_fold_into_modulation_is_exact(chunks, shift_chunk, scale_chunk):
    k, d, n = 32, 24, 20
    g = torch.Generator().manual_seed(chunks + scale_chunk)
    mod_w = torch.randn(chunks * k, d, generator=g, dtype=torch.float64) * 0.2
    mod_b = torch.randn(chunks * k, generator=g, dtype=torch.float64) * 0.2
    target = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, k, generator=g, dtype=torch.float64)
    vec = torch.randn(2, d, generator=g, dtype=torch.float64)
    s = torch.rand(k, generator=g, dtype=torch.float64) * 8 + 0.1

    y, before = _modulated_input(x, vec, mod_w, mod_b, k, shift_chunk, scale_chunk)
    new_w, new_b = fold_into_modulation(mod_w, mod_b, s.float(), scale_chunk, shift_chunk)
    y_folded, after = _modulated_input(x, vec, new_w, new_b, k, shift_chunk, scale_chunk)
    s64 = s.float().double()
    torch.testing.assert_close(y_folded, y / s64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_folded @ (target * s64).t(), y @ target.t(), rtol=1e-10, atol=1e-10)
    for i in set(range(chunks)) - {shift_chunk, scale_chunk}:  # gates and the other pair are untouched
        assert torch.equal(before[i], after[i])


def test_fold_into_modulation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="chunks of K=7"):
        fold_into_modulation(torch.randn(30, 4), torch.randn(30), torch.rand(7) + 0.5, 1, 0)
    with pytest.raises(ValueError, match="chunk 6 out of range"):
        fold_into_modulation(torch.randn(24, 4), torch.randn(24), torch.rand(4) + 0.5, 6, 0)


def test_fold_into_norm_is_exact():
    k = 16
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, k, generator=g, dtype=torch.float64)
    gamma, beta = (
        torch.randn(k, generator=g, dtype=torch.float64),
        torch.randn(k, generator=g, dtype=torch.float64),
    )
    s = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    new_gamma, new_beta = fold_into_norm(gamma, beta, s)
    y = torch.nn.functional.layer_norm(x, (k,), gamma, beta)
    torch.testing.assert_close(torch.nn.functional.layer_norm(x, (k,), new_gamma, new_beta), y / s)
    assert fold_into_norm(gamma, None, s)[1] is None


def test_find_fold_sites_per_family():
    k, d = 8, 8
    flux = {
        "double_blocks.0.img_mod.lin.weight": (6 * k, d),
        "double_blocks.0.img_mod.lin.bias": (6 * k,),
        "double_blocks.0.img_attn.qkv.weight": (3 * k, k),
        "double_blocks.0.img_mlp.0.weight": (4 * k, k),
        "double_blocks.0.img_mlp.2.weight": (k, 4 * k),
        "double_blocks.0.txt_attn.qkv.weight": (3 * k, k),
        "single_blocks.0.modulation.lin.weight": (3 * k, d),
        "single_blocks.0.modulation.lin.bias": (3 * k,),
        "single_blocks.0.linear1.weight": (7 * k, k),
        "single_blocks.0.linear2.weight": (k, 5 * k),
    }
    sites = {(s.targets, s.source): s for s in find_fold_sites(flux)}
    assert sites[(("double_blocks.0.img_attn.qkv",), "double_blocks.0.img_mod.lin")].scale_chunk == 1
    assert sites[(("double_blocks.0.img_mlp.0",), "double_blocks.0.img_mod.lin")].shift_chunk == 3
    assert sites[(("single_blocks.0.linear1",), "single_blocks.0.modulation.lin")].scale_chunk == 1
    assert len(sites) == 3  # txt_mod.lin is absent → txt_attn.qkv has no site; down-projections never do

    mmdit = {
        "joint_blocks.1.context_block.adaLN_modulation.1.weight": (2 * k, d),  # last context block: pre_only
        "joint_blocks.1.context_block.adaLN_modulation.1.bias": (2 * k,),
        "joint_blocks.1.context_block.attn.qkv.weight": (3 * k, k),
        "joint_blocks.1.x_block.adaLN_modulation.1.weight": (6 * k, d),
        "joint_blocks.1.x_block.adaLN_modulation.1.bias": (6 * k,),
        "joint_blocks.1.x_block.attn.qkv.weight": (3 * k, k),
        "joint_blocks.1.x_block.mlp.fc1.weight": (4 * k, k),
    }
    got = {(s.targets[0], s.shift_chunk, s.scale_chunk) for s in find_fold_sites(mmdit)}
    assert got == {
        ("joint_blocks.1.context_block.attn.qkv", 0, 1),
        ("joint_blocks.1.x_block.attn.qkv", 0, 1),
        ("joint_blocks.1.x_block.mlp.fc1", 3, 4),
    }

    qwen = {
        "transformer_blocks.0.img_mod.1.weight": (6 * k, d),
        "transformer_blocks.0.img_mod.1.bias": (6 * k,),
        **{f"transformer_blocks.0.attn.{p}.weight": (k, k) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    }
    (site,) = find_fold_sites(qwen)
    assert site.targets == tuple(f"transformer_blocks.0.attn.{p}" for p in ("to_k", "to_q", "to_v"))

    lumina = {
        "layers.0.attention_norm1.weight": (k,),
        "layers.0.attention.qkv.weight": (3 * k, k),
        "layers.0.ffn_norm1.weight": (k,),
        "layers.0.feed_forward.w1.weight": (4 * k, k),
        "layers.0.feed_forward.w3.weight": (4 * k, k),
        "layers.0.feed_forward.w2.weight": (k, 4 * k),
    }
    assert {(s.source, s.targets, s.kind) for s in find_fold_sites(lumina)} == {
        ("layers.0.attention_norm1", ("layers.0.attention.qkv",), "norm"),
        ("layers.0.ffn_norm1", ("layers.0.feed_forward.w1", "layers.0.feed_forward.w3"), "norm"),
    }

    wan = {"blocks.0.cross_attn.q.weight": (k, k), "blocks.0.self_attn.q.weight": (k, k)}
    assert (
        find_fold_sites(wan) == []
    )  # norm3 without affine weight (cross_attn_norm=False): nothing to fold into
    assert len(find_fold_sites({**wan, "blocks.0.norm3.weight": (k,), "blocks.0.norm3.bias": (k,)})) == 1

    wrong_chunks = {
        "double_blocks.0.img_mod.lin.weight": (5 * k, d),
        "double_blocks.0.img_mod.lin.bias": (5 * k,),
        "double_blocks.0.img_attn.qkv.weight": (3 * k, k),
    }
    assert find_fold_sites(wrong_chunks) == []


def test_fold_smoothing_rewrites_source_and_every_target():
    k, d = 8, 6
    g = torch.Generator().manual_seed(11)
    tensors = {
        "b.mod.weight": torch.randn(6 * k, d, generator=g),
        "b.mod.bias": torch.randn(6 * k, generator=g),
        "b.q.weight": torch.randn(k, k, generator=g),
        "b.k.weight": torch.randn(2 * k, k, generator=g),
    }
    s = torch.rand(k, generator=g) + 0.5
    site = FoldSite(("b.k", "b.q"), "b.mod", "modulation", shift_chunk=0, scale_chunk=1)
    out = fold_smoothing(site, s, tensors)
    assert set(out) == set(tensors)
    torch.testing.assert_close(out["b.q.weight"], tensors["b.q.weight"] * s)
    torch.testing.assert_close(out["b.k.weight"], tensors["b.k.weight"] * s)
    expected_w, expected_b = fold_into_modulation(tensors["b.mod.weight"], tensors["b.mod.bias"], s, 1, 0)
    assert torch.equal(out["b.mod.weight"], expected_w) and torch.equal(out["b.mod.bias"], expected_b)
    with pytest.raises(KeyError, match="b.v.weight"):
        fold_smoothing(FoldSite(("b.v",), "b.mod", "modulation", 0, 1), s, tensors)


def test_plan_smoothquant_folds_two_sites_of_one_source_exactly():
    """A Flux-style double block: img_mod.lin feeds img_attn.qkv (shift/scale chunks 0, 1) and img_mlp.0
    (chunks 3, 4). Both sites fold into the same modulation Linear; the block's Linear outputs must not
    change, and the layers that cannot fold (img_mlp.2) get a smoothing vector instead."""
    k, d, hidden = 16, 12, 32
    g = torch.Generator().manual_seed(12)
    tensors = {
        "double_blocks.0.img_mod.lin.weight": torch.randn(6 * k, d, generator=g, dtype=torch.float64) * 0.3,
        "double_blocks.0.img_mod.lin.bias": torch.randn(6 * k, generator=g, dtype=torch.float64) * 0.3,
        "double_blocks.0.img_attn.qkv.weight": torch.randn(3 * k, k, generator=g, dtype=torch.float64),
        "double_blocks.0.img_mlp.0.weight": torch.randn(hidden, k, generator=g, dtype=torch.float64),
        "double_blocks.0.img_mlp.2.weight": torch.randn(k, hidden, generator=g, dtype=torch.float64),
    }
    x = torch.randn(2, 5, k, generator=g, dtype=torch.float64)
    vec = torch.randn(2, d, generator=g, dtype=torch.float64)

    def block_linear_outputs(t):
        mod_w, mod_b = t["double_blocks.0.img_mod.lin.weight"], t["double_blocks.0.img_mod.lin.bias"]
        attn_in, _ = _modulated_input(x, vec, mod_w, mod_b, k, 0, 1)
        mlp_in, _ = _modulated_input(x, vec, mod_w, mod_b, k, 3, 4)
        hidden_in = torch.nn.functional.gelu(mlp_in @ t["double_blocks.0.img_mlp.0.weight"].t())
        return {
            "double_blocks.0.img_attn.qkv": (attn_in, attn_in @ t["double_blocks.0.img_attn.qkv.weight"].t()),
            "double_blocks.0.img_mlp.0": (mlp_in, mlp_in @ t["double_blocks.0.img_mlp.0.weight"].t()),
            "double_blocks.0.img_mlp.2": (hidden_in, None),
        }

    stats = ActivationStats()
    for name, (inputs, _) in block_linear_outputs(tensors).items():
        stats.observe(name, inputs)
    quantized = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2"]
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    plan = sq_plan(quantized, tensors.__getitem__, shapes, stats, alpha=0.5, fold=True)
    assert [site.targets for site in plan.folded] == [
        ("double_blocks.0.img_attn.qkv",),
        ("double_blocks.0.img_mlp.0",),
    ]
    assert set(plan.smooth) == {"double_blocks.0.img_mlp.2"}
    assert plan.alphas == dict.fromkeys(quantized, 0.5)
    before, after = block_linear_outputs(tensors), block_linear_outputs({**tensors, **plan.replaced})
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0"):
        torch.testing.assert_close(after[name][1], before[name][1], rtol=1e-10, atol=1e-10)
        assert not torch.allclose(after[name][0], before[name][0])  # the input itself was divided by s

    unfolded = sq_plan(quantized, tensors.__getitem__, shapes, stats, alpha=0.5, fold=False)
    assert set(unfolded.smooth) == set(quantized) and not unfolded.replaced
    empty = ActivationStats()
    assert sq_plan(quantized, tensors.__getitem__, shapes, empty).unseen == quantized
