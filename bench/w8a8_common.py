"""Shared pieces of the GPU scripts: command line, environment record, W8A8 inputs and checks, timing,
result files."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def import_kernels():
    """The pack's ``kernels`` package, imported as ``dit_quant.kernels`` (no ComfyUI needed)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from _pack import import_pack

    import_pack()
    import dit_quant.kernels as kernels

    return kernels


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring, with the --out option every script
    has."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="extra output folder (default $OUT)")
    return parser


def probe_arguments(doc: str, script: str, print_sm90_report, configure=None) -> argparse.Namespace | None:
    """The arguments of a probe that also has an ``--aot`` mode: with --aot, ``print_sm90_report()`` runs
    (no GPU needed) and None comes back; otherwise the probe needs a CUDA GPU (``require_cuda``).
    ``configure(parser)`` adds the probe's own options."""
    parser = arg_parser(doc)
    parser.add_argument("--aot", action="store_true", help="compile for sm_90 and report; no GPU needed")
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    if args.aot:
        print_sm90_report()
        return None
    require_cuda(script)
    return args


def aot_compile_helpers():
    """tests/test_kernels_aot.py, whose ``_compile`` (and signature tables) the probes' --aot reports use:
    a Triton wheel's ptxas and cuobjdump, no GPU."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import test_kernels_aot

    return test_kernels_aot


def require_cuda(script: str) -> None:
    """Exit with status 2 and a one-line message where no CUDA GPU is visible (every benchmark needs one)."""
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU (torch {torch.__version__} sees none)", file=sys.stderr)
        raise SystemExit(2)


def environment() -> dict:
    """GPU, driver and library versions plus the exact command, for the result files."""
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count, "driver": driver, "cuda": torch.version.cuda,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def layer_inputs(m: int, k: int, n: int, seed: int, with_bias: bool = True) -> dict:
    """Fresh random bf16 activation (a few 30x outlier channels, as DiT activations have), an int8
    weight with per-channel fp32 scales, a bf16 bias, and the matching bf16 weight for the baseline."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    x[:, torch.randint(0, k, (4,), device="cuda", generator=g)] *= 30.0
    weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    weight_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, device="cuda", generator=g).bfloat16() if with_bias else None
    return {"x": x.bfloat16(), "weight": weight, "weight_scale": weight_scale, "bias": bias,
            "weight_bf16": (weight.float() * weight_scale[:, None]).bfloat16()}


class BesideInputs(NamedTuple):
    """A layer for the probes that quantize beside a GEMM (see ``quantize_beside_inputs``)."""

    x: torch.Tensor
    x2: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    q2: torch.Tensor
    scale2: torch.Tensor
    out: torch.Tensor


def quantize_beside_inputs(m: int, k: int, n: int) -> BesideInputs:
    """``layer_inputs`` without bias, plus ``q``/``scale`` (the pack's quantization of ``x``, the GEMM's
    operand), ``x2`` (a copy of ``x``) with empty ``q2``/``scale2`` for the side quantization to write, and
    an empty bf16 ``out`` [m, n]."""
    from dit_quant.kernels import w8a8_triton

    layer = layer_inputs(m, k, n, 0, with_bias=False)
    x = layer["x"]
    q, scale = w8a8_triton.quantize_rows_triton(x)
    return BesideInputs(x, x.clone(), layer["weight"], layer["weight_scale"], q, scale, torch.empty_like(q),
                        torch.empty_like(scale), torch.empty(m, n, device=x.device, dtype=torch.bfloat16))


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Error of out vs ref: max |diff| / (|ref| + 1e-2 * max|ref|) and the share of elements beyond
    one bf16 ulp (2**-7 relative) of that denominator."""
    out, ref = out.float(), ref.float()
    denom = ref.abs() + 1e-2 * ref.abs().max()
    rel = (out - ref).abs() / denom
    return {"max_rel_err": rel.max().item(), "frac_over_1ulp": (rel > 2.0**-7).float().mean().item(),
            "finite": bool(torch.isfinite(out).all().item())}


def time_ms(fn, graph: bool = False, produced: torch.Tensor | None = None) -> float:
    """Median milliseconds of fn (triton.testing.do_bench: L2 flushed between runs, warm-up first);
    graph=True times the replay of a CUDA graph of fn instead (no Python/launch overhead).

    ``produced`` (fn's input activation) times fn in a model's cache state instead: before each run the
    L2 is emptied by *reading* 256 MB (clean lines; do_bench's flush writes zeros, so its dirty lines are
    written back to memory during the timed run) and then ``produced`` is rewritten, as the op before a
    linear layer leaves its output in L2."""
    import triton

    run = fn
    if graph:
        from dit_quant.kernels.cuda_graphs import graph_of  # importable once import_kernels() has run

        run = graph_of(fn).replay
    if produced is None:
        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    return _time_after_producer(run, produced)


@functools.cache
def _eviction_buffer(device: torch.device) -> torch.Tensor:
    return torch.ones(64 << 20, device=device, dtype=torch.int32)  # 256 MB, 5x the H100/H200 L2


def _time_after_producer(run, produced: torch.Tensor, repeats: int = 50) -> float:
    source = produced.clone()
    evict = _eviction_buffer(produced.device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for _ in range(5):
        run()
    for start, end in events:
        evict.max()
        produced.copy_(source)
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_results(stem: str, payload: dict, markdown: str, out_dir: str | None) -> list[pathlib.Path]:
    """Write <stem>.json and <stem>.md into bench/results/ and, if given, out_dir (e.g. $OUT)."""
    written = []
    for directory in {RESULTS_DIR, *([pathlib.Path(out_dir)] if out_dir else [])}:
        for suffix, text in ((".json", json.dumps(payload, indent=1)), (".md", markdown)):
            path = directory / f"{stem}{suffix}"
            write_atomic(path, text)
            written.append(path)
    return written


def writes_reference_rows(run, q: torch.Tensor, scale: torch.Tensor, q_ref: torch.Tensor,
                          scale_ref: torch.Tensor) -> bool:
    """Whether ``run()`` writes the reference's int8 rows and row scales into ``q`` / ``scale``, which are
    poisoned first (99 and NaN), so stale results cannot pass."""
    q.fill_(99)
    scale.fill_(float("nan"))
    run()
    return torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def probe_markdown(title: str, env: dict, doc: str, table: str, *notes: str) -> str:
    """A probe's result page: title with GPU and versions, the command, the docstring's first paragraph,
    optional notes, the table."""
    return "\n".join([f"# {title} ({env['gpu']}, torch {env['torch']}, triton {env['triton']})", "",
                      f"Command: `{env['command']}` ({env['date_utc']})", "", doc.split("\n\n")[0], "",
                      *(line for note in notes for line in (note, "")), table, ""])


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
