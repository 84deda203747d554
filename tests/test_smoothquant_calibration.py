"""Calibration statistics: hook recording against direct recomputation, buckets, reservoir, merge, files."""

import json

import pytest
import torch
from dit_quant.quant.calibration import (
    METADATA_KEY,
    ActivationRecorder,
    ActivationStats,
    CalibrationFileError,
    bucket_of_fraction,
)
from dit_quant.quant.int8_linear import Int8Linear
from safetensors import safe_open
from safetensors.torch import save_file


class TinyMlp(torch.nn.Module):
    """fc1 → GELU → fc2, plus an INT8 layer reading fc2's output (recorded through its in_features)."""

    def __init__(self, k: int = 12, hidden: int = 20, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = torch.nn.Linear(k, hidden)
        self.fc2 = torch.nn.Linear(hidden, k)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.q = Int8Linear.from_float(torch.randn(6, k, generator=g), torch.randn(6, generator=g))

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        y = self.fc2(h)
        return self.q(y)

    def layer_inputs(self, x):
        """The input each layer sees, computed directly (no hooks)."""
        h = torch.nn.functional.gelu(self.fc1(x))
        return {"fc1": x, "fc2": h, "q": self.fc2(h)}


def _batches(count, seed=1, k=12):
    g = torch.Generator().manual_seed(seed)
    # varied leading shapes: [B, T, K] and [M, K]; channel 3 is an outlier channel
    shapes = [(2, 5, k), (7, k), (1, 9, k), (3, 4, k)]
    out = []
    for i in range(count):
        x = torch.randn(shapes[i % len(shapes)], generator=g)
        x[..., 3] *= 25.0
        out.append(x)
    return out


def test_recorder_matches_direct_recomputation_exactly():
    model = TinyMlp()
    batches = _batches(6)
    with ActivationRecorder(model, ActivationStats(num_buckets=3)) as recorder:
        assert recorder.layer_count == 3
        for i, x in enumerate(batches):
            recorder.bucket = i % 3
            model(x)
    stats = recorder.stats
    assert stats.layers() == ["fc1", "fc2", "q"]
    direct = {name: [] for name in stats.layers()}
    for x in batches:
        for name, inp in model.layer_inputs(x).items():
            direct[name].append(inp.reshape(-1, inp.shape[-1]))
    for name, rows in direct.items():
        all_rows = torch.cat(rows)
        assert torch.equal(stats.absmax[name], all_rows.abs().amax(dim=0).float())
        assert stats.rows[name] == all_rows.shape[0]
        for bucket in range(3):
            in_bucket = torch.cat(rows[bucket::3])
            assert torch.equal(stats.bucket_absmax[name][bucket], in_bucket.abs().amax(dim=0))
    # hooks are gone after the context: a further call changes nothing
    before = stats.rows["fc1"]
    model(batches[0])
    assert stats.rows["fc1"] == before


def test_recorder_requires_a_bucket_when_buckets_are_kept():
    model = TinyMlp()
    with ActivationRecorder(model, ActivationStats(num_buckets=2)), pytest.raises(ValueError, match="bucket"):
        model(_batches(1)[0])


def test_bucket_of_fraction():
    assert [bucket_of_fraction(f, 4) for f in (0.0, 0.24, 0.25, 0.99, 1.0)] == [0, 0, 1, 3, 3]
    with pytest.raises(ValueError):
        bucket_of_fraction(0.5, 0)


def test_observe_rejects_changed_channel_count():
    stats = ActivationStats()
    stats.observe("a", torch.randn(3, 8))
    with pytest.raises(ValueError, match="K=4"):
        stats.observe("a", torch.randn(3, 4))


def test_reservoir_holds_real_rows_and_is_uniform():
    capacity, total, trials = 10, 100, 400
    counts = torch.zeros(total)
    for trial in range(trials):
        stats = ActivationStats(reservoir_rows=capacity, seed=trial)
        rows = torch.arange(total, dtype=torch.float32)[:, None].repeat(1, 3) + 0.5
        for start in range(0, total, 13):  # uneven batches
            stats.observe("layer", rows[start : start + 13])
        sample = stats.reservoir["layer"]
        assert sample.shape == (capacity, 3)
        ids = sample[:, 0].long()
        assert torch.equal(sample, ids[:, None].float().repeat(1, 3) + 0.5)  # every kept row is a real row
        assert ids.unique().numel() == capacity
        counts[ids] += 1
    expected = trials * capacity / total  # 40 per row under uniform sampling
    # rows early and late in the stream are kept equally often (a biased reservoir fails this badly)
    assert abs(counts[:50].mean() - expected) < 0.1 * expected
    assert abs(counts[50:].mean() - expected) < 0.1 * expected
    assert ((counts - expected) ** 2 / expected).sum() < 160  # chi-square, 99 dof: p ≈ 1e-4 at 160


def test_merge_equals_one_pass_and_keeps_reservoir_bounded():
    batches = _batches(8)
    one = ActivationStats(num_buckets=2, reservoir_rows=5)
    a = ActivationStats(num_buckets=2, reservoir_rows=5, seed=1)
    b = ActivationStats(num_buckets=2, reservoir_rows=5, seed=2)
    for i, x in enumerate(batches):
        one.observe("l", x, bucket=i % 2)
        (a if i < 5 else b).observe("l", x, bucket=i % 2)
    a.prompts, b.prompts, a.steps_per_prompt, b.steps_per_prompt = 3, 2, 4, 4
    merged = a.merge(b)
    assert torch.equal(merged.absmax["l"], one.absmax["l"])
    assert torch.equal(merged.bucket_absmax["l"], one.bucket_absmax["l"])
    assert merged.rows["l"] == one.rows["l"]
    assert (merged.prompts, merged.steps_per_prompt) == (5, 4)
    all_rows = torch.cat([x.reshape(-1, 12) for x in batches])
    assert merged.reservoir["l"].shape == (5, 12)
    for row in merged.reservoir["l"]:
        assert (all_rows == row).all(dim=1).any()
    with pytest.raises(ValueError, match="buckets"):
        merged.merge(ActivationStats(num_buckets=3))


def test_save_load_round_trip_is_exact(tmp_path):
    stats = ActivationStats(num_buckets=2, reservoir_rows=4, seed=7)
    for i, x in enumerate(_batches(5)):
        stats.observe("double_blocks.0.img_attn.qkv", x, bucket=i % 2)
        stats.observe("double_blocks.0.img_mlp.2", x[..., :7] * 0.1, bucket=i % 2)
    stats.prompts, stats.steps_per_prompt, stats.settings = 4, 4, {"sampler": "euler", "cfg": 3.5}
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["calib.safetensors"]  # no temp file left behind
    loaded = ActivationStats.load(path)
    assert loaded.layers() == stats.layers()
    for layer in stats.layers():
        assert torch.equal(loaded.absmax[layer], stats.absmax[layer])
        assert torch.equal(loaded.bucket_absmax[layer], stats.bucket_absmax[layer])
        assert torch.equal(loaded.reservoir[layer], stats.reservoir[layer])
        assert loaded.rows[layer] == stats.rows[layer]
    assert (loaded.prompts, loaded.steps_per_prompt, loaded.settings) == (
        4,
        4,
        {"sampler": "euler", "cfg": 3.5},
    )
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header["layers"] == 2 and header["prompts"] == 4
    assert header["absmax_max"] == pytest.approx(max(v.max().item() for v in stats.absmax.values()))
    assert header["outlier_layers"][0]["layer"] == "double_blocks.0.img_attn.qkv"  # channel 3 is 25× larger
    text = loaded.summary()
    assert "4 prompt(s) × 4 steps" in text and "double_blocks.0.img_attn.qkv" in text


def test_load_rejects_bad_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CalibrationFileError, match="garbage.safetensors"):
        ActivationStats.load(garbage)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(2)}, str(foreign))
    with pytest.raises(CalibrationFileError, match="not a DiT Quant calibration file"):
        ActivationStats.load(foreign)

    stats = ActivationStats(num_buckets=2)
    stats.observe("l", torch.randn(4, 6), bucket=0)
    good = tmp_path / "good.safetensors"
    stats.save(good)
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["bucket_absmax/l"] = torch.zeros(3, 6)  # wrong bucket count
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(CalibrationFileError, match=r"bucket_absmax/l must be fp32 \[2, 6\]"):
        ActivationStats.load(broken)
    del tensors["bucket_absmax/l"], tensors["rows/l"]
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(CalibrationFileError, match="rows/l"):
        ActivationStats.load(broken)
