"""The README's manual install section, followed verbatim in a fresh virtual environment: after it, the
user's torch is unchanged and a ComfyUI server lists the pack's nodes in ``/object_info``.

"ComfyUI's environment" is built first, as a user already has it: a fresh ``python -m venv``, this machine's
CPU torch (``pip install torch==2.13.0``) and ComfyUI's own requirements.txt (from the ComfyUI tree the tests
use, v0.3.75 from the package registry) under a constraints file that keeps that torch, minus the optional
packages listed in ``COMFYUI_OPTIONAL`` (torchaudio has no build for this torch; the others are UI extras or
nodes ComfyUI starts without). The torchvision import shim of scripts/setup.sh is added, as the registry's
torchvision is a CUDA build (this machine only; a user's CUDA torch needs none).

Then the commands of the README's first shell block under "## Install" run one by one, without
constraints: ``cd .../custom_nodes`` enters the custom_nodes folder of a fresh ComfyUI base directory,
``git clone <url>`` (no GitHub here) copies this working tree's files (tracked and not ignored) into the
folder the clone would create, after checking the URL is the project's repository; ``pip install -r ...``
runs with the fresh environment's pip, first as a dry run whose plan must not contain torch.
Any other command in that block fails the test, so the README cannot drift from what is tested.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import tomllib
from browser_harness import prepare_base_dir, start_server
from comfy_harness import PACK_FOLDER_NAME, REPO_ROOT, comfy_root
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TORCH_PIN = "torch==2.13.0"
COMFYUI_OPTIONAL = {
    "torch",
    "torchaudio",
    "comfyui-workflow-templates",
    "comfyui-embedded-docs",
    "alembic",
    "sqlalchemy",
    "kornia",
    "spandrel",
}
TORCH_STACK = ("torch", "torchvision", "triton")
INSTALL_TIMEOUT_S = 600


def readme_install_commands() -> list[str]:
    """Shell lines (comments and blanks dropped) of the first fenced block under the README's "## Install"."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = re.search(r"^## Install[^\n]*\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert section, "README.md has no '## Install' section"
    block = re.search(r"```(?:bash|sh|shell)?\n(.*?)```", section.group(1), re.S)
    assert block, "the README's Install section has no shell block"
    lines = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    return [shlex.join(words) for words in lines if words]


def run(command: list[str], cwd: pathlib.Path, timeout: float = INSTALL_TIMEOUT_S) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (
        f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def installed_versions(python: pathlib.Path, names) -> dict[str, str | None]:
    script = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    return json.loads(run([str(python), "-c", script, *names], cwd=REPO_ROOT))


def copy_working_tree(destination: pathlib.Path) -> None:
    """The files a clone of this checkout would hold if everything not ignored were committed."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for relative in filter(None, listed):
        source = REPO_ROOT / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)


@pytest.fixture(scope="module")
def comfyui_env(tmp_path_factory):
    """A fresh virtual environment with torch and ComfyUI's requirements (see the module docstring)."""
    root = tmp_path_factory.mktemp("readme_install")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling all of torch and transformers costs more than compiling what is imported
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "-q", "--no-compile"]
    run(pip + [TORCH_PIN], cwd=root)
    constraints = root / "constraints.txt"
    constraints.write_text(f"torch=={installed_versions(python, ['torch'])['torch']}\n")
    comfyui_requirements = [
        line.split("#", 1)[0].strip() for line in (comfy_root() / "requirements.txt").read_text().splitlines()
    ]
    wanted = [
        r
        for r in comfyui_requirements
        if r and canonicalize_name(Requirement(r).name) not in COMFYUI_OPTIONAL
    ]
    run(pip + ["-c", str(constraints), *wanted], cwd=root)
    site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root
    ).strip()
    shutil.copy(
        REPO_ROOT / "scripts" / "torchvision_cpu_shim.py",
        pathlib.Path(site) / "dit_quant_torchvision_cpu_shim.py",
    )
    (pathlib.Path(site) / "dit_quant_torchvision_cpu_shim.pth").write_text(
        "import dit_quant_torchvision_cpu_shim\n"
    )
    yield root, python
    shutil.rmtree(venv, ignore_errors=True)  # 1.5 GB


@pytest.mark.slow
def test_readme_install_keeps_torch_and_the_server_lists_the_nodes(comfy, comfyui_env):
    root, python = comfyui_env
    # The user's ComfyUI folder (custom_nodes, models, ...); its code is the tree at comfy_root().
    base = root / "ComfyUI"
    (base / "custom_nodes").mkdir(parents=True)
    repository = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    torch_before = installed_versions(python, TORCH_STACK)

    commands = readme_install_commands()
    assert commands[0].startswith("cd ") and any(c.startswith("pip install") for c in commands), commands
    cwd = root
    for command in commands:
        words = shlex.split(command)
        if words[0] == "cd":
            cwd = (cwd / words[1]).resolve()
            assert cwd == (base / "custom_nodes").resolve(), (
                f"README: {command!r} is not ComfyUI/custom_nodes"
            )
        elif words[:2] == ["git", "clone"]:
            assert words[2].removesuffix(".git") == repository, f"README clones {words[2]}, not {repository}"
            folder = cwd / (words[3] if len(words) > 3 else words[2].removesuffix(".git").rsplit("/", 1)[1])
            copy_working_tree(folder)
        elif words[:2] == ["pip", "install"]:
            pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", *words[2:]]
            report = json.loads(run(pip + ["--dry-run", "--quiet", "--report", "-"], cwd=cwd))
            planned = {canonicalize_name(item["metadata"]["name"]) for item in report["install"]}
            assert not planned & {canonicalize_name(n) for n in TORCH_STACK}, f"pip would change {planned}"
            run(pip + ["-q"], cwd=cwd)
        else:
            pytest.fail(f"README install step the test does not know how to follow: {command!r}")

    assert installed_versions(python, TORCH_STACK) == torch_before
    assert (base / "custom_nodes" / PACK_FOLDER_NAME / "__init__.py").is_file()
    prepare_base_dir(base, link_pack=False)  # the pack is the cloned copy, not the test suite's symlink
    server = start_server(base, python=str(python))
    try:
        object_info = server.get_json("/object_info")
    finally:
        server.stop()
    listed = {
        name
        for name, info in object_info.items()
        if info["python_module"] == f"custom_nodes.{PACK_FOLDER_NAME}"
    }
    assert listed == set(comfy.modules["loaded_node_classes"]), server.log_tail()
