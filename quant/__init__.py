"""Quantization algorithms and file formats (no ComfyUI imports)."""
