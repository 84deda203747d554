"""Test set-up: the repo root as package ``dit_quant``; Triton's CPU interpreter when there is no GPU;
a session-wide real ComfyUI (``comfy`` fixture)."""

import os
import pathlib
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through numpy

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parent.parent / d) for d in ("scripts", "tests")]
from _pack import import_pack  # noqa: E402

import_pack()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The real ComfyUI with the pack loaded through its custom-node loader (see comfy_harness.py)."""
    from comfy_harness import load_comfy

    return load_comfy(tmp_path_factory.mktemp("comfy_base"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
