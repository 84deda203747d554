"""scripts/evaluate_quality.py on saved outputs: report numbers, JSON and PNG files, clear errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import torch
from dit_quant.quant.quality import latent_relative_error
from evaluate_quality import main
from PIL import Image
from safetensors.torch import save_file

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "evaluate_quality.py"


def _write(path, latents, images=None, key="latents"):
    tensors = {key: latents.contiguous()}
    if images is not None:
        tensors["images"] = images.contiguous()
    save_file(tensors, str(path))
    return str(path)


def test_cli_report_json_and_plot(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 4, 6, 6, generator=g)
    ref_img = torch.rand(8, 16, 16, 3, generator=g)
    good = ref + 0.02 * torch.randn(ref.shape, generator=g)
    bad = ref + 0.06 * torch.randn(ref.shape, generator=g)
    noisy = (ref_img + 0.03 * torch.randn(ref_img.shape, generator=g)).clamp(0, 1)
    files = {
        "ref": _write(tmp_path / "ref.safetensors", ref, ref_img),
        "good": _write(tmp_path / "good.safetensors", good, noisy),
        "bad": _write(tmp_path / "bad.latent", bad, key="latent_tensor"),  # ComfyUI Save Latent layout
    }
    out_json, out_png = tmp_path / "r" / "report.json", tmp_path / "r" / "report.png"
    code = main(
        [
            "--reference",
            files["ref"],
            "--variant",
            f"good={files['good']}",
            "--variant",
            f"bad={files['bad']}",
            "--compare",
            "good:bad",
            "--n-boot",
            "2000",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "good − bad (latent_rel_error)" in printed and "good is better" in printed
    report = json.loads(out_json.read_text())
    np.testing.assert_allclose(
        report["variants"]["good"]["latent_rel_error"]["per_sample"], latent_relative_error(good, ref).numpy()
    )
    assert set(report["variants"]["good"]) == {"latent_rel_error", "psnr", "ssim"}
    assert set(report["variants"]["bad"]) == {"latent_rel_error"}  # no images in that file
    (comparison,) = report["comparisons"]
    assert comparison["difference"]["high"] < 0 and comparison["ratio"] > 2
    image = np.asarray(Image.open(out_png))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 10


def test_cli_errors_name_the_file(tmp_path):
    ref = _write(tmp_path / "ref.safetensors", torch.randn(2, 3))
    wrong = _write(tmp_path / "wrong.safetensors", torch.randn(2, 3), key="something")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--reference", ref, "--variant", f"x={wrong}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "wrong.safetensors: no tensor named latents" in result.stderr
