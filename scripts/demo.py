"""The demo: a small SD3-architecture DiT quantized and sampled through a real ComfyUI, with a result table.

Builds a random-weight MMDiT from ComfyUI's own class (no downloads), then runs API graphs through
ComfyUI's PromptExecutor: bf16 reference, on-the-fly INT8 W8A8, save → load INT8 checkpoint, both
kernel backends. Prints weight bytes, latent error against the bf16 run and sampling time.
Run: bash scripts/demo.sh (sets everything up first).
"""

import argparse
import logging
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

import torch  # noqa: E402
from comfy_harness import (  # noqa: E402
    TinyModelSpec,
    load_comfy,
    load_int8_graph,
    quantize_and_save_int8,
    sample_latent,
    save_tiny_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="MMDiT depth (hidden = 64 × depth)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--triton-interpreter",
        action="store_true",
        help="without a GPU, also run the Triton kernels in Triton's CPU interpreter (slow)",
    )
    args = parser.parse_args()

    base = pathlib.Path(tempfile.mkdtemp(prefix="dit_quant_demo_"))
    logging.getLogger().setLevel(logging.ERROR)  # ComfyUI's notes about optional audio/video extras
    comfy = load_comfy(base)
    logging.getLogger().setLevel(logging.INFO)
    spec = TinyModelSpec(depth=args.depth)
    save_tiny_model(comfy.diffusion_models_dir / "demo_sd3.safetensors", spec, seed=0)
    unet = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "demo_sd3.safetensors", "weight_dtype": "default"},
    }

    def run(nodes: dict, model_ref: list) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        latent = sample_latent(
            comfy, nodes, model_ref, seed=args.seed, steps=args.steps, size=args.size, spec=spec
        )
        return latent, time.perf_counter() - start

    int8_path = quantize_and_save_int8(comfy, "demo_sd3.safetensors", "demo_sd3_int8")
    float_path = comfy.diffusion_models_dir / "demo_sd3.safetensors"

    rows = []
    reference, t_ref = run({"load": unet}, ["load", 0])
    rows.append(("bf16 (stock UNETLoader)", float_path.stat().st_size, 0.0, t_ref))
    backends = ["torch"] + (["triton"] if torch.cuda.is_available() or args.triton_interpreter else [])
    for backend in backends:
        latent, t = run(load_int8_graph(int8_path.name, backend), ["patch", 0])
        err = ((latent.double() - reference.double()).norm() / reference.double().norm()).item()
        rows.append((f"INT8 W8A8, {backend} kernel", int8_path.stat().st_size, err, t))

    print(
        f"\nDiT Quant demo: SD3/MMDiT depth {args.depth} (hidden {64 * args.depth}), {args.size}px, "
        f"{args.steps} euler steps, seed {args.seed}, ComfyUI at {comfy.root}"
    )
    print(f"{'variant':34} {'file MB':>8} {'latent rel. err vs bf16':>24} {'graph time s':>13}")
    for name, size, err, t in rows:
        print(f"{name:34} {size / 1e6:8.2f} {err:24.4f} {t:13.2f}")
    if torch.cuda.is_available():
        print("GPU present: the triton row ran the compiled kernels.")
    elif args.triton_interpreter:
        print("No GPU: the triton row ran Triton's CPU interpreter (correctness, not speed).")
    else:
        print("No GPU: INT8 ran the torch reference kernel (CPU timings say nothing about GPU speed).")


if __name__ == "__main__":
    main()
