"""The pack's metadata is what the Comfy registry and ComfyUI-Manager need, and its requirements never touch
the user's torch.

Rules checked (docs.comfy.org/registry/specifications): ``[project]`` name (< 100 characters; letters,
digits, ``-_.``; no consecutive special characters; starts with a letter), a three-part semantic version, a
description, a license given as ``{file = ...}`` (an existing file) or ``{text = ...}``, ``urls.Repository``;
``[tool.comfy]`` PublisherId, DisplayName and Icon (an https URL of an image). ComfyUI's own parser of a
custom node's pyproject.toml (``comfy_config.config_parser``) must read the same values.
"""

import re
import sys
import urllib.parse

import pytest
import tomllib
from comfy_harness import REPO_ROOT, comfy_root
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = REPO_ROOT / "pyproject.toml"
REQUIREMENTS = REPO_ROOT / "requirements.txt"
NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")
PUBLISHER_ID = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp")
# Packages that come with the user's own (CUDA) PyTorch build: a requirement on any of them can make pip
# replace that build with another one.
USER_TORCH_STACK = {"torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "xformers"}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def requirement_lines() -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return [line for line in lines if line]


def test_project_name_version_description(pyproject):
    project = pyproject["project"]
    assert len(project["name"]) < 100 and NODE_NAME.match(project["name"]), project["name"]
    assert SEMVER.match(project["version"]), f"version {project['version']!r} is not X.Y.Z"
    assert len(project["description"].strip()) >= 20


def test_license_is_a_file_or_text_table(pyproject):
    license_ = pyproject["project"]["license"]
    assert isinstance(license_, dict) and set(license_) in ({"file"}, {"text"}), license_
    if "file" in license_:
        assert (REPO_ROOT / license_["file"]).is_file()
    else:
        assert license_["text"].strip()


def test_repository_url(pyproject):
    url = urllib.parse.urlsplit(pyproject["project"]["urls"]["Repository"])
    assert url.scheme == "https" and url.netloc and url.path.strip("/").count("/") == 1, url.geturl()


def test_tool_comfy_publisher_display_name_icon(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert PUBLISHER_ID.match(comfy["PublisherId"]), f"PublisherId {comfy['PublisherId']!r}"
    assert comfy["DisplayName"].strip()
    icon = urllib.parse.urlsplit(comfy["Icon"])
    assert icon.scheme == "https" and icon.netloc, (
        f"Icon must be an https URL of an image, got {comfy['Icon']!r}"
    )
    assert icon.path.lower().endswith(IMAGE_SUFFIXES), f"Icon {comfy['Icon']!r} is not an image file"


def test_icon_in_this_repository_exists(pyproject):
    """An icon served from this repository (raw.githubusercontent.com/<owner>/<repo>/<branch>/<path>) must be
    a file of the working tree, as the registry fetches it from the published repository."""
    icon = urllib.parse.urlsplit(pyproject["tool"]["comfy"]["Icon"])
    repository = urllib.parse.urlsplit(pyproject["project"]["urls"]["Repository"]).path.strip("/")
    parts = icon.path.strip("/").split("/")
    if icon.netloc != "raw.githubusercontent.com" or "/".join(parts[:2]) != repository:
        pytest.skip("the icon is not served from this repository")
    assert (REPO_ROOT / "/".join(parts[3:])).is_file()


def test_comfyui_reads_the_same_metadata(pyproject):
    """ComfyUI's own custom-node config parser (the one its loader runs) agrees with the TOML."""
    sys.path.insert(0, str(comfy_root()))
    try:
        from comfy_config.config_parser import extract_node_configuration
    finally:
        sys.path.remove(str(comfy_root()))
    config = extract_node_configuration(str(REPO_ROOT))
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert config.project.name == project["name"]
    assert config.project.version == project["version"]
    assert config.project.urls.repository == project["urls"]["Repository"]
    assert config.tool_comfy.publisher_id == comfy["PublisherId"]
    assert config.tool_comfy.display_name == comfy["DisplayName"]
    assert config.tool_comfy.icon == comfy["Icon"]


def test_requirements_never_touch_torch():
    lines = requirement_lines()
    assert lines, "requirements.txt lists nothing"
    for line in lines:
        assert not line.startswith("-"), (
            f"pip option in requirements.txt: {line!r} (users' pip config decides)"
        )
        requirement = Requirement(line)
        assert canonicalize_name(requirement.name) not in USER_TORCH_STACK, f"requirements.txt lists {line!r}"
        assert not canonicalize_name(requirement.name).startswith("nvidia-"), line


def test_pyproject_dependencies_match_requirements(pyproject):
    """The registry reads [project] dependencies, ComfyUI-Manager and users read requirements.txt."""
    declared = {str(Requirement(d)) for d in pyproject["project"]["dependencies"]}
    assert declared == {str(Requirement(line)) for line in requirement_lines()}
