"""DiT Quant: INT8 W8A8 and GGUF diffusion transformers for ComfyUI.

ComfyUI imports this folder as a custom node pack; only ``nodes`` is imported here.
``quant`` and ``kernels`` do not need ComfyUI.
"""

try:
    import comfy  # noqa: F401  (importable only inside ComfyUI)
except ImportError:  # imported outside ComfyUI, e.g. by a test runner collecting the folder: no nodes
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
