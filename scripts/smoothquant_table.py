"""Measured error table of the SmoothQuant recipe on a tiny MMDiT with deliberately built activation outliers.

Builds the model of tests/test_smoothquant_comfy.py (random weights from ComfyUI's own MMDiT class, a few
input channels of qkv/fc1/proj/fc2 made 10–50× larger, see tests/calibration_harness.py), calibrates on 4
prompts, and runs every variant through ComfyUI's real executor and the Quantization Quality Evaluation
node: latent relative error against the bf16 run over prompts × seeds, mean with a bootstrap 95% CI, and
the paired CI of each variant against plain per-channel W8A8. No downloads; CPU is fine.

  .venv/bin/python scripts/smoothquant_table.py [--seeds 4] [--steps 4]
"""

import argparse
import json
import logging
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

from calibration_harness import (  # noqa: E402
    apply_smoothquant_node,
    register,
    sampling_inputs,
    save_outlier_mmdit,
    text_encoder_node,
)
from comfy_harness import TinyModelSpec, load_comfy  # noqa: E402

CALIBRATION_PROMPTS = [
    "a red fox in snow",
    'a neon sign that reads "OPEN"',
    "a bowl of ramen",
    "a lighthouse",
]
EVAL_PROMPTS = ["an astronaut riding a horse", "a watercolor of a harbor"]
VARIANTS = {  # name → ApplySmoothQuant settings (None: plain per-channel W8A8 of QuantizeModelInt8)
    "plain W8A8": None,
    "SmoothQuant α=0.5": {"protection": "none", "alpha": 0.5},
    "SmoothQuant α=0.5 + ffn_down": {"protection": "ffn_down", "alpha": 0.5},
    "SmoothQuant α=0.5 + ffn_down+attn_out": {"protection": "ffn_down+attn_out", "alpha": 0.5},
    "SmoothQuant α search + ffn_down": {"protection": "ffn_down", "alpha": 0.5, "alpha_search": True},
    "SmoothQuant α=0.5 folded where exact + ffn_down": {
        "protection": "ffn_down",
        "alpha": 0.5,
        "fold_smoothing": "where exact",
    },
    "SmoothQuant α=0.5 fold only (exportable) + ffn_down": {
        "protection": "ffn_down",
        "alpha": 0.5,
        "fold_smoothing": "only where exact",
    },
    "SmoothQuant α=0.3 + ffn_down": {"protection": "ffn_down", "alpha": 0.3},
    "protection ffn_down only (no SmoothQuant)": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (2 prompts)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2, help="MMDiT depth (hidden = 64 × depth)")
    args = parser.parse_args()

    logging.getLogger().setLevel(logging.ERROR)
    comfy = load_comfy(pathlib.Path(tempfile.mkdtemp(prefix="dit_quant_sq_")))
    register(comfy)
    spec = TinyModelSpec(depth=args.depth)
    save_outlier_mmdit(comfy.diffusion_models_dir / "outliers.safetensors", spec, seed=0)
    graph = {
        "load": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "outliers.safetensors", "weight_dtype": "default"},
        },
        "clip": text_encoder_node(spec),
        "plain W8A8": {
            "class_type": "QuantizeModelInt8",
            "inputs": {"model": ["load", 0], "keep_layers": ""},
        },
        "calib": {
            "class_type": "SmoothQuantCalibrate",
            "inputs": {
                "model": ["load", 0],
                **sampling_inputs(CALIBRATION_PROMPTS, steps=args.steps, seed=100),
                "timestep_buckets": 0,
                "reservoir_rows": 32,
            },
        },
    }
    for name, settings in VARIANTS.items():
        if settings is not None:
            graph[name] = apply_smoothquant_node(**settings)
    # protection alone: FFN down-projections kept, every other layer plain W8A8
    graph["protection ffn_down only (no SmoothQuant)"] = {
        "class_type": "QuantizeModelInt8",
        "inputs": {
            "model": ["load", 0],
            "keep_layers": "\n".join(
                f"joint_blocks.{b}.{s}.mlp.fc2"
                for b in range(args.depth)
                for s in ("x_block", "context_block")
                if (b, s) != (args.depth - 1, "context_block")
            ),
        },
    }
    rows = []
    for name in VARIANTS:
        label = name if name != "plain W8A8" else "plain"  # variant_a must be named apart from variant_b
        run = dict(graph)
        run["eval"] = {
            "class_type": "QualityEvaluation",
            "inputs": {
                "reference_model": ["load", 0],
                "variant_a": [name, 0],
                "variant_b": ["plain W8A8", 0],
                **sampling_inputs(EVAL_PROMPTS, steps=args.steps, seed=7),
                "seeds_per_prompt": args.seeds,
                "n_boot": 10000,
                "variant_a_name": label,
                "variant_b_name": "plain W8A8",
            },
        }
        report = json.loads(comfy.run(run)["eval"]["dit_quant_quality"][0])
        variant = report["variants"][label]["latent_rel_error"]["mean"]
        comparison = next(c for c in report["comparisons"] if c["metric"] == "latent_rel_error")
        rows.append((name, variant, comparison))
    samples = 2 * args.seeds
    print(
        f"\nLatent relative error vs the bf16 run, tiny outlier MMDiT (depth {args.depth}), "
        f"{samples} samples, {args.steps} euler steps:\n"
    )
    print(
        "| variant | latent rel. error, mean [95% CI] | vs plain W8A8: error ratio | paired diff [95% CI] |"
    )
    print("|---|---|---|---|")
    for name, mean, c in rows:
        d = c["difference"]
        print(
            f"| {name} | {mean['mean']:.4f} [{mean['low']:.4f}, {mean['high']:.4f}] | {c['ratio']:.2f}× | "
            f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] |"
        )


if __name__ == "__main__":
    main()
