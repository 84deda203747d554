"""Convert a diffusion model (safetensors, or another GGUF file) to GGUF, in the ComfyUI-GGUF layout.

    python scripts/convert_gguf.py flux1-dev.safetensors flux1-dev-Q4_K_M.gguf --preset Q4_K_M

K-quants are computed with our port of llama.cpp's reference quantizer (no llama.cpp needed); on a CUDA
machine pass ``--device cuda`` to compute them on the GPU (much faster than the CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _pack import import_pack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import_pack()
    from dit_quant.quant.gguf_type_rules import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        help="a .safetensors diffusion model (ComfyUI keys, optional "
        "'model.diffusion_model.' prefix) or a .gguf file",
    )
    parser.add_argument("destination", help="the .gguf file to write")
    parser.add_argument(
        "--preset", default="Q4_K_M", choices=list(PRESETS), help="weight type (default Q4_K_M)"
    )
    parser.add_argument(
        "--arch", default=None, help="general.architecture to write (default: detected from the tensor names)"
    )
    parser.add_argument(
        "--device", default=None, help="device for the K-quant search, e.g. cuda (default: cpu)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination file")
    parser.add_argument("--dry-run", action="store_true", help="print each tensor's planned type and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from dit_quant.quant.gguf_writer import (
        gguf_file_sources,
        plan_state_dict,
        safetensors_sources,
        write_gguf,
    )

    if not os.path.isfile(args.source):
        print(f"error: {args.source} does not exist", file=sys.stderr)
        return 2
    if os.path.exists(args.destination) and not args.overwrite and not args.dry_run:
        print(f"error: {args.destination} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        sources = (
            gguf_file_sources(args.source)
            if args.source.endswith(".gguf")
            else safetensors_sources(args.source)
        )
        if args.dry_run:
            for plan in plan_state_dict(sources, args.preset):
                print(f"{plan.key:<72} {str(tuple(plan.shape)):<22} {plan.qtype:<5} {plan.reason}")
            return 0
        start = time.time()

        def progress(done: int, total: int) -> None:
            print(
                f"\r{done}/{total} tensors, {time.time() - start:.0f} s", end="", file=sys.stderr, flush=True
            )

        device = torch.device(args.device) if args.device else None
        plans = write_gguf(
            args.destination,
            sources,
            args.preset,
            architecture=args.arch,
            metadata={"dit_quant.source": os.path.basename(args.source)},
            progress=progress,
            device=device,
        )
    except (ValueError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.qtype] = counts.get(plan.qtype, 0) + 1
    size = os.path.getsize(args.destination)
    print(
        f"\nwrote {args.destination}: {size / 2**20:.1f} MiB, "
        + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
