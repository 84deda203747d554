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
