"""Dequantization of every GGUF type: the plain-torch reference and the Triton kernel (interpreter on CPU,
native on a GPU) must be bit-identical to ``gguf.quants.dequantize``, on random bytes and on files we write.

"Bit-identical" = the same float32 bit patterns; on fully random bytes, whose fp16 scales can be NaN/inf,
NaN results must sit at the same positions (NaN payloads are not compared).
"""

import gguf
import numpy as np
import pytest
import torch
from dit_quant.kernels.gguf_dequant_reference import BLOCK_LAYOUT, dequantize_reference
from dit_quant.kernels.gguf_dequant_triton import TRITON_TYPES, dequantize_triton
from dit_quant.quant.gguf_reader import read_gguf
from dit_quant.quant.gguf_types import TYPES, WRITABLE_TYPES
from dit_quant.quant.gguf_writer import SourceTensor, write_gguf

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_TYPES = list(TYPES)
# Byte ranges of each block format that hold fp16 scales (d, dmin, m); "finite" blocks get sane values there.
FP16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
    "F16": [0],
}


def random_blocks(qtype: str, n_blocks: int, seed: int, finite: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, type_size = BLOCK_LAYOUT[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if finite:
        for at in FP16_FIELDS.get(qtype, []):
            raw[:, at : at + 2] = (
                (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
        if qtype == "F32":
            raw[:] = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(-1, 4)
        if qtype == "BF16":
            raw[:, 1] &= 0xBF  # clear the top exponent bit: no inf/NaN
    return raw


def expected_values(raw: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(-1)


def assert_same_bits(got: torch.Tensor, expected: np.ndarray, label: str) -> None:
    got = got.detach().cpu().numpy().reshape(-1)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan), f"{label}: NaN positions differ"
    assert np.array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan]), (
        f"{label}: values differ"
    )


@pytest.mark.parametrize("finite", [True, False], ids=["finite-scales", "random-bytes"])
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_torch_reference_is_bit_identical(qtype, finite):
    block_size, _ = BLOCK_LAYOUT[qtype]
    raw = random_blocks(qtype, 96, seed=ALL_TYPES.index(qtype), finite=finite)
    got = dequantize_reference(torch.from_numpy(raw).to(DEVICE), qtype, (96 * block_size,))
    assert got.dtype == torch.float32
    expected = expected_values(raw, qtype)
    if finite:
        assert np.isfinite(expected).all()
    assert_same_bits(got, expected, qtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN scales, interpreter
@pytest.mark.parametrize("finite", [True, False], ids=["finite-scales", "random-bytes"])
@pytest.mark.parametrize("qtype", TRITON_TYPES)
def test_triton_is_bit_identical(qtype, finite):
    block_size, _ = BLOCK_LAYOUT[qtype]
    n_blocks = 40 if block_size == 256 else 1100  # several programs and a masked tail
    raw = random_blocks(qtype, n_blocks, seed=100 + TRITON_TYPES.index(qtype), finite=finite)
    got = dequantize_triton(torch.from_numpy(raw).to(DEVICE), qtype, (n_blocks * block_size,))
    assert_same_bits(got, expected_values(raw, qtype), qtype)


def test_triton_covers_every_type():
    assert set(TRITON_TYPES) == set(ALL_TYPES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "IQ4_XS"])
def test_half_outputs_round_to_nearest_even(qtype, dtype):
    """bf16/fp16 outputs equal torch's round-to-nearest-even of the float32 values (also in the
    interpreter, whose own float casts truncate)."""
    block_size, _ = BLOCK_LAYOUT[qtype]
    raw = torch.from_numpy(random_blocks(qtype, 64, seed=7, finite=True)).to(DEVICE)
    exact = dequantize_reference(raw, qtype, (64 * block_size,))
    assert torch.equal(dequantize_triton(raw, qtype, exact.shape, dtype), exact.to(dtype))
    assert torch.equal(dequantize_reference(raw, qtype, exact.shape, dtype), exact.to(dtype))


@pytest.mark.parametrize("qtype", WRITABLE_TYPES)
def test_files_we_write_dequantize_identically(tmp_path, qtype):
    torch.manual_seed(11)
    weight = torch.randn(40, 768)
    sources = {
        "joint_blocks.0.x_block.attn.proj.weight": SourceTensor(
            weight.shape, weight.dtype, True, lambda: weight
        )
    }
    write_gguf(tmp_path / "w.gguf", sources, qtype, architecture="sd3")
    tensor = read_gguf(tmp_path / "w.gguf").tensors["joint_blocks.0.x_block.attn.proj.weight"]
    raw = tensor.data.view(torch.uint8).reshape(-1).contiguous()
    on_file = gguf.GGUFReader(tmp_path / "w.gguf").tensors[0]
    expected = gguf.quants.dequantize(on_file.data, on_file.tensor_type).reshape(-1)
    assert_same_bits(dequantize_reference(raw.to(DEVICE), qtype, tensor.shape), expected, f"{qtype} torch")
    assert_same_bits(dequantize_triton(raw.to(DEVICE), qtype, tensor.shape), expected, f"{qtype} triton")


def test_wrong_byte_count_is_a_clear_error():
    raw = torch.zeros(35, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="do not hold a tensor of shape"):
        dequantize_reference(raw, "Q8_0", (32,))
    with pytest.raises(ValueError, match="do not hold a tensor of shape"):
        dequantize_triton(raw, "Q8_0", (32,))
    with pytest.raises(ValueError, match="no dequantizer"):
        dequantize_reference(raw, "IQ2_XXS", (32,))
