"""ComfyUI nodes of the pack: one module per node family, each exporting NODE_CLASSES."""

import importlib

# Each module lists its node classes in NODE_CLASSES; a class's DISPLAY_NAME is shown in the UI.
_NODE_MODULES = (
    "int8_nodes", "calibration_nodes", "eval_nodes", "gguf_nodes", "fused_nodes", "cuda_graph_nodes",
)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _name in _NODE_MODULES:
    for _cls in importlib.import_module(f".{_name}", __name__).NODE_CLASSES:
        NODE_CLASS_MAPPINGS[_cls.__name__] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_cls.__name__] = _cls.DISPLAY_NAME
