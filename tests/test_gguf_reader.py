"""GGUF reading: the community layout, bit-exact round trips of files we write, clear errors for broken
files, and a fuzz test (every mutation of a valid file loads cleanly or fails with GGUFFormatError)."""

import contextlib
import signal
import struct

import gguf
import numpy as np
import pytest
import torch
from dit_quant.kernels.gguf_dequant_reference import dequantize_reference
from dit_quant.quant.gguf_reader import GGUFFormatError, read_gguf
from dit_quant.quant.gguf_types import WRITABLE_TYPES
from dit_quant.quant.gguf_writer import SourceTensor, write_gguf

Q = gguf.GGMLQuantizationType


def community_style_file(path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A file laid out like ComfyUI-GGUF's converter makes them: prefixed ComfyUI keys, F32 1-D tensors,
    a conv weight stored as rows of 256 with its original shape in comfy.gguf.orig_shape.*."""
    w = gguf.GGUFWriter(path=None, arch="flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    values = {
        "double_blocks.0.img_attn.qkv.weight": rng.standard_normal((96, 256)).astype(np.float32),
        "double_blocks.0.img_attn.qkv.bias": rng.standard_normal(96).astype(np.float32),
        "img_in.weight": rng.standard_normal((64, 64)).astype(np.float32),
        "conv.weight": rng.standard_normal((16, 8, 4, 4)).astype(np.float32),
    }
    w.add_tensor(
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        gguf.quants.quantize(values["double_blocks.0.img_attn.qkv.weight"], Q.Q8_0),
        raw_dtype=Q.Q8_0,
    )
    w.add_tensor(
        "model.diffusion_model.double_blocks.0.img_attn.qkv.bias", values["double_blocks.0.img_attn.qkv.bias"]
    )
    w.add_tensor("model.diffusion_model.img_in.weight", values["img_in.weight"].astype(np.float16))
    w.add_array("comfy.gguf.orig_shape.model.diffusion_model.conv.weight", [16, 8, 4, 4])
    w.add_tensor(
        "model.diffusion_model.conv.weight",
        gguf.quants.quantize(values["conv.weight"].reshape(-1, 256), Q.Q5_0),
        raw_dtype=Q.Q5_0,
    )
    w.add_tensor("first_stage_model.decoder.weight", rng.standard_normal((4, 4)).astype(np.float32))
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_reads_community_layout(tmp_path):
    rng = np.random.default_rng(0)
    values = community_style_file(tmp_path / "c.gguf", rng)
    model = read_gguf(tmp_path / "c.gguf")
    assert model.architecture == "flux"
    assert list(model.tensors) == list(values)  # prefix dropped, foreign keys ignored, file order kept
    qkv = model.tensors["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.qtype.name == "Q8_0" and qkv.shape == (96, 256) and qkv.data.dtype == torch.uint8
    bias = model.tensors["double_blocks.0.img_attn.qkv.bias"]
    assert bias.qtype.name == "F32" and torch.equal(
        bias.data, torch.from_numpy(values["double_blocks.0.img_attn.qkv.bias"])
    )
    assert model.tensors["img_in.weight"].data.dtype == torch.float16
    conv = model.tensors["conv.weight"]
    assert conv.shape == (16, 8, 4, 4)
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(values["conv.weight"].reshape(-1, 256), Q.Q5_0), Q.Q5_0
    )
    ours = dequantize_reference(conv.data, "Q5_0", conv.shape)
    assert np.array_equal(ours.numpy(), expected.reshape(16, 8, 4, 4))


@pytest.mark.parametrize("qtype", WRITABLE_TYPES)
def test_files_we_write_decode_bit_exactly_with_gguf(tmp_path, qtype):
    torch.manual_seed(3)
    weights = {
        "joint_blocks.0.x_block.attn.qkv.weight": torch.randn(48, 512),
        "joint_blocks.0.x_block.attn.proj.weight": torch.randn(32, 256, dtype=torch.bfloat16),
        "joint_blocks.0.x_block.attn.proj.bias": torch.randn(32),
    }
    sources = {k: SourceTensor(v.shape, v.dtype, v.dim() == 2, lambda v=v: v) for k, v in weights.items()}
    write_gguf(tmp_path / "m.gguf", sources, qtype)
    ours = read_gguf(tmp_path / "m.gguf")
    theirs = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.name for t in theirs.tensors} == set(weights)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype.name == (qtype if t.name.endswith(".weight") else "F32")
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(mine.shape))
        got = mine.float32()
        assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32)), (
            t.name
        )


# ----------------------------------------------------------------------------- malformed files


def valid_file(tmp_path) -> bytes:
    path = tmp_path / "valid.gguf"
    community_style_file(path, np.random.default_rng(1))
    return path.read_bytes()


def tensor_info_offsets(tmp_path, data: bytes) -> list[dict[str, int]]:
    """File offsets of each tensor info's dims, type and data-offset fields (found with gguf's own reader)."""
    path = tmp_path / "probe.gguf"
    path.write_bytes(data)
    out = []
    for t in gguf.GGUFReader(path).tensors:
        name_len, n_dims = int(t.field.parts[0][0]), int(t.field.parts[2][0])
        dims_at = t.field.offset + 8 + name_len + 4
        out.append({"dims": dims_at, "type": dims_at + 8 * n_dims, "offset": dims_at + 8 * n_dims + 4})
    return out


def expect_error(tmp_path, data: bytes, match: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFFormatError, match=match) as info:
        read_gguf(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    expect_error(tmp_path, b"", "empty")


def test_wrong_magic(tmp_path):
    data = bytearray(valid_file(tmp_path))
    data[:4] = b"GGML"
    expect_error(tmp_path, bytes(data), "not a GGUF file")


def test_truncated_header(tmp_path):
    data = valid_file(tmp_path)
    expect_error(tmp_path, data[:40], "truncated")
    expect_error(tmp_path, data[:10], "truncated")


def test_truncated_tensor_data(tmp_path):
    data = valid_file(tmp_path)
    expect_error(tmp_path, data[:-100], "past the end of the file")


def test_tensor_offset_past_end(tmp_path):
    data = bytearray(valid_file(tmp_path))
    at = tensor_info_offsets(tmp_path, bytes(data))[0]["offset"]
    struct.pack_into("<Q", data, at, 1 << 40)
    expect_error(tmp_path, bytes(data), "past the end of the file")


def test_unknown_tensor_type(tmp_path):
    data = bytearray(valid_file(tmp_path))
    at = tensor_info_offsets(tmp_path, bytes(data))[0]["type"]
    struct.pack_into("<I", data, at, 99)
    expect_error(tmp_path, bytes(data), "unknown ggml type id 99")
    struct.pack_into("<I", data, at, int(Q.IQ2_XXS))  # a real ggml type this pack does not decode
    expect_error(tmp_path, bytes(data), "IQ2_XXS is not supported")


def test_row_not_whole_blocks(tmp_path):
    data = bytearray(valid_file(tmp_path))
    at = tensor_info_offsets(tmp_path, bytes(data))[0]["dims"]
    struct.pack_into("<Q", data, at, 250)  # ne0 of a Q8_0 tensor: not a multiple of 32
    expect_error(tmp_path, bytes(data), "not a whole number of Q8_0 blocks")


def test_original_shape_mismatch(tmp_path):
    w = gguf.GGUFWriter(path=None, arch="sd3")
    w.add_array("comfy.gguf.orig_shape.x.weight", [3, 5, 7])
    w.add_tensor("x.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(path=tmp_path / "s.gguf")
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFormatError, match="original shape"):
        read_gguf(tmp_path / "s.gguf")


def test_huge_array_count_fails_fast(tmp_path):
    w = gguf.GGUFWriter(path=None, arch="sd3")
    w.add_array("some.list", ["a", "b"])
    w.add_tensor("x.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(path=tmp_path / "a.gguf")
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray((tmp_path / "a.gguf").read_bytes())
    key_at = data.index(b"some.list")
    count_at = key_at + len(b"some.list") + 4 + 4  # after the value type and the item type
    struct.pack_into("<Q", data, count_at, 1 << 60)
    expect_error(tmp_path, bytes(data), "truncated")


# ----------------------------------------------------------------------------- fuzzing


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"read_gguf took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def mutate(data: bytes, rng: np.random.Generator, header_end: int) -> bytes:
    out = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:  # flip bits in the header
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(0, header_end))
            out[at] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # overwrite a header word with an extreme value
        at = int(rng.integers(0, header_end - 8))
        extremes = [0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, 1 << 62, (1 << 64) - 1]
        value = extremes[int(rng.integers(0, len(extremes)))]
        struct.pack_into("<Q", out, at, value)
    elif kind == 2:  # truncate anywhere
        out = out[: int(rng.integers(0, len(out)))]
    elif kind == 3:  # random bytes anywhere
        at = int(rng.integers(0, len(out) - 16))
        out[at : at + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    else:  # append or insert garbage
        at = int(rng.integers(0, len(out)))
        out[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return bytes(out)


def test_fuzz_every_mutation_loads_cleanly_or_fails_cleanly(tmp_path):
    data = valid_file(tmp_path)
    header_end = gguf.GGUFReader(tmp_path / "valid.gguf").data_offset
    rng = np.random.default_rng(2024)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"loaded": 0, "error": 0}
    for case in range(600):
        path.write_bytes(mutate(data, rng, header_end))
        with time_limit(5.0):
            try:
                model = read_gguf(path)
            except GGUFFormatError:
                outcomes["error"] += 1
                continue
            for tensor in model.tensors.values():  # a clean load is usable: every tensor decodes
                assert tensor.float32().shape == tensor.shape, f"case {case}"
            outcomes["loaded"] += 1
    assert outcomes["error"] >= 100 and outcomes["loaded"] >= 50, outcomes
