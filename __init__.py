"""DiT Quant: INT8 W8A8 and GGUF diffusion transformers for ComfyUI.

ComfyUI imports this folder as a custom node pack; only ``nodes`` is imported here.
``quant`` and ``kernels`` do not need ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
