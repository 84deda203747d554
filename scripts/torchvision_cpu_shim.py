"""Lets the registry's CUDA-only torchvision wheel import on a CPU-only torch (test environment only).

Its compiled ops library cannot load there, and ``torchvision._meta_registrations`` then fails on
``torchvision::nms`` not existing. Defining the two op schemas first lets the pure-Python parts,
all ComfyUI needs, import. Installed into the virtual environment by scripts/setup.sh via a .pth file.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "torchvision._meta_registrations"


class _DefineNmsSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        import torch

        for name in ("nms", "qnms"):
            try:
                torch.library.define(
                    f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                )
            except RuntimeError:
                pass  # already defined by a working native library
        return None


sys.meta_path.insert(0, _DefineNmsSchemas())
