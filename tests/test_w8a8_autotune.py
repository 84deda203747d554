"""W8A8 config choice: the on-disk cache round trip (CPU) and tuning on a GPU (chosen config persisted,
read back by a fresh process state, and correct)."""

from __future__ import annotations

import json

import pytest
import torch
from dit_quant.kernels import w8a8_autotune, w8a8_triton


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("DIT_QUANT_AUTOTUNE_CACHE", str(path))
    monkeypatch.setattr(w8a8_autotune, "_disk_entries", None)
    monkeypatch.setattr(w8a8_autotune, "_chosen", {})
    return path


def test_configs_with_tails_survive_the_disk_cache(fresh_cache):
    tail = w8a8_triton.GemmConfig("tma", 64, 128, 128, 8, 4, 4)
    version = w8a8_autotune._KEY_VERSION
    entries = {
        f"{version}|a": w8a8_triton.GemmConfig("tma", 128, 256, 128, 8, 8, 4, True, tail),
        f"{version}|b": w8a8_triton.GemmConfig("int8", 16, 32, 256, 1, 4, 4),
    }
    w8a8_autotune._save_disk_cache(entries)
    assert json.loads(fresh_cache.read_text())[f"{version}|a"]["tail"]["block_n"] == 128
    assert w8a8_autotune._load_disk_cache() == entries


def test_unreadable_or_old_cache_entries_are_ignored(fresh_cache, caplog):
    fresh_cache.write_text(json.dumps({"v2|old": {"kind": "int8"}}))
    assert w8a8_autotune._load_disk_cache() == {}
    fresh_cache.write_text("{not json")
    assert w8a8_autotune._load_disk_cache() == {}
    assert "ignoring unreadable autotune cache" in caplog.text


def test_every_candidate_launch_fits_and_tails_are_smaller_tiles():
    for cc in (80, 86, 89, 90):
        for regime in ("small", "mid", "large"):
            for config in w8a8_triton.candidate_configs(cc, regime):
                main, *tails = config.launches()
                assert main.tail is None and len(tails) == (config.tail is not None)
                for tail in tails:
                    assert tail.block_m * tail.block_n < main.block_m * main.block_n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuned_config_is_persisted_and_reused(fresh_cache):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4608, 512, device="cuda", generator=g).bfloat16()
    weight = torch.randint(-127, 128, (3072, 512), device="cuda", dtype=torch.int8, generator=g)
    weight_scale = torch.rand(3072, device="cuda", generator=g) * 0.01 + 1e-3
    chosen = w8a8_autotune.choose_config(x, weight, weight_scale, None, None)
    saved = json.loads(fresh_cache.read_text())
    assert [w8a8_triton.GemmConfig.from_dict(v) for v in saved.values()] == [chosen]
    w8a8_autotune._chosen.clear()
    w8a8_autotune._disk_entries = None
    assert w8a8_autotune.choose_config(x, weight, weight_scale, None, None) == chosen  # read back, no tuning
    # every int8-activation kind and tiling computes the same exact int32 product and per-element epilogue
    cc = w8a8_triton.arch_key(torch.cuda.get_device_capability())
    default = w8a8_triton.candidate_configs(cc, "large")[0]
    torch.testing.assert_close(w8a8_triton.w8a8_linear_triton(x, weight, weight_scale, None, None, chosen),
                               w8a8_triton.w8a8_linear_triton(x, weight, weight_scale, None, None, default),
                               rtol=0, atol=0)


def test_tuning_retimes_the_finalists_and_skips_failing_configs(monkeypatch):
    """The choice logic alone, on a table of timings (the GPU test below times real kernels)."""
    configs = [w8a8_triton.GemmConfig("tma", 128, 256 // 2**i, 128, 8, 4, 4) for i in range(5)]
    short = dict(zip(configs, [1.0, 1.1, 1.2, 5.0, 0.1], strict=True))
    long = dict(zip(configs[:3], [1.3, 1.05, 1.2], strict=True))
    timed: list[tuple] = []

    def fake_gpu_time_ms(fn, rep_ms=20):
        config = fn()
        timed.append((config, rep_ms))
        return (long if rep_ms > 20 else short)[config]

    def run(config):
        if config is configs[4]:
            raise RuntimeError("out of resources: shared memory")  # rejected by the compiler: skipped
        return config

    monkeypatch.setattr(w8a8_autotune, "gpu_time_ms", fake_gpu_time_ms)
    assert w8a8_autotune._tune(configs, run) == configs[1]
    assert sorted((configs.index(c), rep) for c, rep in timed if rep > 20) == [(0, 60), (1, 60), (2, 60)]


def test_tuning_with_no_timeable_candidate_chooses_nothing():
    """Nothing timed (every candidate failed, e.g. out of memory): no result, so nothing reaches the disk
    cache (the caller serves its default for the session)."""
    configs = [w8a8_triton.GemmConfig("int8", 16, 32, 256, 1, 4, 4)]

    def run(config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert w8a8_autotune._tune(configs, run) is None


def test_timing_without_room_for_the_l2_flush_falls_back_to_plain_replays(monkeypatch):
    """Fault injection at Triton's timing functions (no GPU here): do_bench's 256 MB flush buffer does
    not fit, so the candidate is timed by flushless graph replays instead of failing the tuning."""
    import triton.testing
    from dit_quant.kernels import cuda_graphs

    def no_capture(fn, calls=1):
        raise RuntimeError("no CUDA graphs on this device")

    def flush_does_not_fit(fn, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")

    calls = []
    monkeypatch.setattr(cuda_graphs, "graph_of", no_capture)
    monkeypatch.setattr(triton.testing, "do_bench", flush_does_not_fit)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph",
                        lambda fn, rep, return_mode: calls.append((rep, return_mode)) or 0.25)
    assert w8a8_autotune.gpu_time_ms(lambda: None, rep_ms=60) == 0.25
    assert calls == [(60, "median")]

