"""Imports the repository root as the package ``dit_quant`` without running its ComfyUI-only ``__init__``."""

import pathlib
import sys
import types

PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent


def import_pack() -> types.ModuleType:
    """Registers the repo root as namespace package ``dit_quant`` (idempotent) and returns it."""
    if "dit_quant" not in sys.modules:
        package = types.ModuleType("dit_quant")
        package.__path__ = [str(PACK_ROOT)]
        sys.modules["dit_quant"] = package
    return sys.modules["dit_quant"]


def import_node_module(name: str) -> types.ModuleType:
    """``dit_quant.nodes.<name>`` without running nodes/__init__.py (it imports every node family and
    ComfyUI's ``nodes``, which scripts and GPU tests do not need); ``comfy`` must be importable."""
    import importlib

    import_pack()
    if "dit_quant.nodes" not in sys.modules:
        package = types.ModuleType("dit_quant.nodes")
        package.__path__ = [str(PACK_ROOT / "nodes")]
        sys.modules["dit_quant.nodes"] = package
    return importlib.import_module(f"dit_quant.nodes.{name}")
