"""Quality report of quantized model outputs against a reference, from saved latents (and images).

Each input is a safetensors file holding ``latents`` [S, ...] — or ComfyUI's Save Latent ``latent_tensor`` —
and optionally ``images`` [S, H, W, C] in [0, 1]; sample i of every file must come from the same prompt
and seed. Prints the report (means with bootstrap 95% CIs, paired CIs of variant differences) and can
write it as JSON and the plot as PNG.

  python scripts/evaluate_quality.py --reference bf16.safetensors \\
      --variant smoothquant=sq.safetensors --variant plain=w8a8.safetensors --compare smoothquant:plain \\
      --json report.json --plot report.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
from _pack import import_pack
from safetensors import SafetensorError, safe_open

LATENT_KEYS = ("latents", "latent_tensor")


def read_outputs(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents, images or None) of one file; raises ValueError naming the file when it has no latents."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            latent_key = next((k for k in LATENT_KEYS if k in keys), None)
            if latent_key is None:
                raise ValueError(
                    f"{path}: no tensor named {' or '.join(LATENT_KEYS)} (has: {', '.join(sorted(keys))})"
                )
            return f.get_tensor(latent_key), (f.get_tensor("images") if "images" in keys else None)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _named(value: str, sep: str, what: str) -> tuple[str, str]:
    name, found, rest = value.partition(sep)
    if not found or not name or not rest:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME{sep}VALUE, got {value!r}")
    return name, rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="outputs of the unquantized model")
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        type=lambda v: _named(v, "=", "--variant"),
        help="NAME=FILE outputs of a quantized model (repeatable)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        type=lambda v: _named(v, ":", "--compare"),
        help="A:B paired comparison of variant A against variant B (repeatable)",
    )
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", type=pathlib.Path, help="write the report as JSON here")
    parser.add_argument("--plot", type=pathlib.Path, help="write the plot as PNG here")
    args = parser.parse_args(argv)

    import_pack()
    from dit_quant.quant.atomic_io import atomic_path
    from dit_quant.quant.quality import evaluate_quality

    try:
        reference_latents, reference_images = read_outputs(args.reference)
        latents, images = {}, {}
        for name, path in args.variant:
            latents[name], variant_images = read_outputs(path)
            if variant_images is not None:
                images[name] = variant_images
        report = evaluate_quality(
            reference_latents,
            latents,
            reference_images,
            images or None,
            comparisons=args.compare,
            n_boot=args.n_boot,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2))
    if args.plot:
        from PIL import Image

        pixels = (report.plot()[0].numpy() * 255).round().astype(np.uint8)
        with atomic_path(args.plot) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
