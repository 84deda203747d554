"""Every example workflow, the way a user meets it: the real ComfyUI server with the pack installed, its web
UI in headless Chromium, each ``example_workflows/*.json`` loaded through the page's own loading path
(fetched from the URL ComfyUI's template browser uses, then ``app.loadGraphData``), converted to the API
format in the page (``app.graphToPrompt``) and queued through the server's HTTP API.

What the page must show: no missing node types, no page errors beyond the known first-load noise, and every
widget of our nodes present with a valid value (and, on a freshly created node, with its declared default).
A screenshot of each loaded workflow goes to ``test-artifacts/workflows/``.

Running them on tiny models. The workflows name real files (flux1-dev.safetensors, clip_l, t5xxl, ae) and
real sizes; before queueing, the test rewrites the API prompt from the page, and only in these ways:

* model file names → tiny stand-ins in the server's models folders (``MODEL_STAND_INS``): a 1 M-parameter
  random SD3/MMDiT built from ComfyUI's own class for the diffusion model, INT8 / GGUF files made from it
  by the pack itself, and a random-weight TAESD (ComfyUI's own tiny VAE class) for the VAE;
* text-encoder loaders (CLIPLoader, DualCLIPLoader, ...) → ``DiTQuantTestTextEncoder``, a test-only node
  (tests/calibration_harness.py, installed as its own custom-node folder in the server) giving seeded
  random conditioning shaped for the tiny model: no text encoder exists offline at any size. The stock
  CLIPTextEncode nodes and our nodes' prompt inputs encode through it unchanged;
* sizes and counts (``TINY_SETTINGS``): 64 px, 2 steps, 2 prompts, 1 seed per prompt.

Everything else (loaders, our nodes, KSampler, VAE decode, save nodes) runs as the workflow says.
"""

import json
import pathlib
import shutil

import pytest
from browser_harness import CHROMIUM_ARGS, ComfyPage, chromium_path, prepare_base_dir, start_server
from comfy_harness import PACK_FOLDER_NAME, REPO_ROOT, TinyModelSpec, save_tiny_model
from playwright.sync_api import sync_playwright

EXAMPLES_DIR = REPO_ROOT / "example_workflows"
WORKFLOW_NAMES = sorted(path.stem for path in EXAMPLES_DIR.glob("*.json"))
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts" / "workflows"
TESTS_DIR = pathlib.Path(__file__).resolve().parent
SPEC = TinyModelSpec(depth=2)

# Node types the frontend itself provides (no server class): notes, reroutes, primitives.
FRONTEND_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Widgets the frontend adds on its own (after seed inputs).
FRONTEND_WIDGETS = {"control_after_generate"}

# Workflow file name → tiny stand-in (made by the ``server_models`` fixture) in the same models folder.
MODEL_STAND_INS = {
    "flux1-dev.safetensors": "tiny_sd3.safetensors",
    "flux1-dev-int8.safetensors": "tiny_sd3_int8.safetensors",
    "flux1-dev-int8-sq.safetensors": "tiny_sd3_int8.safetensors",
    "flux1-dev-Q4_K_S.gguf": "tiny_sd3_Q4_K_M.gguf",
    "ae.safetensors": "tiny_taesd.safetensors",
}
TEXT_ENCODER_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader"}
# Nodes whose work takes minutes on real models: they must move ComfyUI's progress bar.
LONG_RUNNING = {
    "QuantizeModelInt8",
    "SmoothQuantCalibrate",
    "QuantizationSensitivity",
    "ApplySmoothQuant",
    "QualityEvaluation",
    "SaveModelGGUF",
}
SAVE_MODEL_NODES = {"SaveInt8Model", "SaveCalibration", "SaveModelGGUF"}
TINY_SETTINGS = {"width": 64, "height": 64, "steps": 2, "num_prompts": 2, "seeds_per_prompt": 1}

TEST_NODES_INIT = f'''"""Test-only nodes for the browser test's server (tests/test_browser_workflows.py)."""
import sys

sys.path.insert(0, {str(TESTS_DIR)!r})
from calibration_harness import FakeTextEncoderNode  # noqa: E402

NODE_CLASS_MAPPINGS = {{"DiTQuantTestTextEncoder": FakeTextEncoderNode}}
'''


def save_tiny_taesd(path: pathlib.Path, latent_channels: int, seed: int = 0) -> None:
    """A random-weight TAESD (ComfyUI's own class): the VAE loader detects it from its tensor names."""
    from comfy.taesd.taesd import TAESD
    from comfy_harness import init_random_
    from safetensors.torch import save_file

    vae = TAESD(latent_channels=latent_channels)
    init_random_(vae, seed)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def server_base(comfy, tmp_path_factory) -> pathlib.Path:
    """The server's base directory: the pack, the test-node folder and the tiny stand-in models. The INT8 and
    GGUF stand-ins are written by the pack's own save nodes, run in the in-process ComfyUI."""
    base = prepare_base_dir(
        tmp_path_factory.mktemp("comfy_server"), {"dit_quant_test_nodes": TEST_NODES_INIT}
    )
    made = comfy.diffusion_models_dir
    save_tiny_model(made / "browser_tiny_sd3.safetensors", SPEC, seed=3)
    load = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "browser_tiny_sd3.safetensors", "weight_dtype": "default"},
    }
    comfy.run(
        {
            "load": load,
            "quant": {"class_type": "QuantizeModelInt8", "inputs": {"model": ["load", 0], "keep_layers": ""}},
            "int8": {
                "class_type": "SaveInt8Model",
                "inputs": {"model": ["quant", 0], "filename": "browser_tiny_sd3_int8", "overwrite": True},
            },
            "gguf": {
                "class_type": "SaveModelGGUF",
                "inputs": {
                    "model": ["load", 0],
                    "filename": "browser_tiny_sd3",
                    "preset": "Q4_K_M",
                    "overwrite": True,
                },
            },
        }
    )
    for made_name, stand_in in (
        ("browser_tiny_sd3.safetensors", "tiny_sd3.safetensors"),
        ("browser_tiny_sd3_int8.safetensors", "tiny_sd3_int8.safetensors"),
        ("browser_tiny_sd3.gguf", "tiny_sd3_Q4_K_M.gguf"),
    ):
        shutil.copy(made / made_name, base / "models" / "diffusion_models" / stand_in)
    save_tiny_taesd(base / "models" / "vae" / "tiny_taesd.safetensors", SPEC.in_channels)
    return base


@pytest.fixture(scope="module")
def server(server_base):
    running = start_server(server_base)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, server):
    comfy_page = ComfyPage(browser, server)
    yield comfy_page
    comfy_page.close()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get_json("/object_info")


@pytest.fixture(scope="module")
def pack_nodes(object_info) -> dict:
    """object_info entries of the pack's nodes (as the server lists them)."""
    return {
        name: info
        for name, info in object_info.items()
        if info["python_module"] == f"custom_nodes.{PACK_FOLDER_NAME}"
    }


def widget_inputs(info: dict) -> dict[str, tuple]:
    """{input name: (type or combo options, options)} of the inputs the frontend shows as widgets."""
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    widgets = {}
    for name, spec in inputs.items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list) or kind in WIDGET_TYPES:
            widgets[name] = (kind, options)
    return widgets


def combo_options(kind, options: dict) -> list | None:
    if isinstance(kind, list):
        return kind
    return options.get("options") if kind == "COMBO" else None


def declared_default(kind, options: dict):
    if "default" in options:
        return options["default"]
    choices = combo_options(kind, options)
    return choices[0] if choices else None


def test_server_lists_the_example_workflows(server):
    """ComfyUI's template browser lists them under the pack, each with its thumbnail (``<name>.jpg``)."""
    templates = server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER_NAME, [])) == WORKFLOW_NAMES
    for name in WORKFLOW_NAMES:
        assert server.request(f"/api/workflow_templates/{PACK_FOLDER_NAME}/{name}.jpg")[0] == 200, name
    assert set(WORKFLOW_NAMES) >= {
        "int8_load_and_sample",
        "int8_quantize_and_save",
        "smoothquant_calibrate_and_save",
        "gguf_load_and_sample",
        "gguf_convert",
        "evaluate_quantized_vs_reference",
    }


def test_page_opens_with_only_known_first_load_noise(page, pack_nodes):
    assert len(pack_nodes) >= 4
    assert page.startup_errors == []
    registered = page.evaluate(
        "(names) => names.filter(n => !(n in LiteGraph.registered_node_types))", sorted(pack_nodes)
    )
    assert registered == []


def test_new_nodes_show_every_widget_with_its_default(page, pack_nodes):
    for node_type, info in sorted(pack_nodes.items()):
        shown = page.new_node_widgets(node_type)
        for name, (kind, options) in widget_inputs(info).items():
            assert name in shown, f"{node_type}: widget {name} missing in the UI"
            default = declared_default(kind, options)
            if default is None:  # a file list that is empty on this server
                continue
            if isinstance(default, float):
                assert shown[name] == pytest.approx(default, rel=1e-9), f"{node_type}.{name}"
            else:
                assert shown[name] == default, f"{node_type}.{name}: {shown[name]!r} != default {default!r}"


def check_widget_value(where: str, value, kind, options: dict) -> None:
    """A loaded workflow's widget value is one the node accepts (file lists are the user's, not checked)."""
    choices = combo_options(kind, options)
    if choices is not None:
        if not where.endswith("_name"):
            assert value in choices, f"{where}: {value!r} not one of {choices}"
        return
    python_type = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    assert isinstance(value, python_type) and not (kind != "BOOLEAN" and isinstance(value, bool)), where
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), (
            f"{where}: {value} out of range"
        )


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_loads_in_the_browser(page, object_info, pack_nodes, name):
    page.clear_errors()
    served = page.load_template(PACK_FOLDER_NAME, name)
    assert served == json.loads((EXAMPLES_DIR / f"{name}.json").read_text())
    page.screenshot(ARTIFACTS_DIR / f"{name}.png")

    assert page.missing_node_types() == []
    assert page.unexpected_errors() == []
    loaded = page.node_widgets()
    assert len(loaded) == len(served["nodes"])
    types = {node["type"] for node in loaded}
    stock_or_ours = {
        t
        for t in types
        if t in object_info
        and (t in pack_nodes or object_info[t]["python_module"].split(".")[0] in ("nodes", "comfy_extras"))
    }
    assert types - FRONTEND_NODE_TYPES - stock_or_ours == set(), "only stock nodes and ours"
    assert "Note" in types or "MarkdownNote" in types, "each workflow explains itself in a note"
    assert types & set(pack_nodes), "each workflow uses the pack"
    for node in loaded:
        if node["type"] not in pack_nodes:
            continue
        declared = widget_inputs(pack_nodes[node["type"]])
        assert set(node["widgets"]) - FRONTEND_WIDGETS == set(declared), f"{name}: {node['type']} widgets"
        for widget, (kind, options) in declared.items():
            check_widget_value(f"{name}: {node['type']}.{widget}", node["widgets"][widget], kind, options)


def tiny_prompt(prompt: dict) -> dict:
    """The page's API prompt rewritten for the tiny models (see the module docstring)."""
    rewritten = {}
    for node_id, node in prompt.items():
        inputs = dict(node["inputs"])
        if node["class_type"] in TEXT_ENCODER_LOADERS:
            rewritten[node_id] = {
                "class_type": "DiTQuantTestTextEncoder",
                "inputs": {
                    "tokens": SPEC.context_tokens,
                    "context_dim": SPEC.context_dim,
                    "pooled_dim": SPEC.pooled_dim,
                },
            }
            continue
        for key, value in inputs.items():
            if isinstance(value, str) and value.endswith((".safetensors", ".gguf", ".ckpt", ".pt")):
                assert value in MODEL_STAND_INS, f"no tiny stand-in for {value} ({node['class_type']}.{key})"
                inputs[key] = MODEL_STAND_INS[value]
            elif key in TINY_SETTINGS and isinstance(value, int) and not isinstance(value, bool):
                inputs[key] = TINY_SETTINGS[key]
        rewritten[node_id] = {**node, "inputs": inputs}
    return rewritten


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_runs_on_tiny_models(page, server, object_info, name):
    page.load_template(PACK_FOLDER_NAME, name)
    prompt = tiny_prompt(page.graph_to_prompt())
    prompt_id = server.queue_prompt(prompt, client_id=page.client_id)
    entry = server.wait_for_prompt(prompt_id, timeout=300)
    assert page.wait_for_end(prompt_id)["type"] == "execution_success"

    outputs = entry["outputs"]
    output_nodes = [
        node_id for node_id, node in prompt.items() if object_info[node["class_type"]]["output_node"]
    ]
    assert output_nodes and all(node_id in outputs for node_id in output_nodes), "every output node reported"
    progress = {(e["node"], e["max"]) for e in page.events(prompt_id) if e["type"] == "progress"}
    for node_id, node in prompt.items():
        shown = outputs.get(node_id, {})
        if node["class_type"] in LONG_RUNNING:
            assert any(shown_by == node_id and total > 0 for shown_by, total in progress), (
                f"{name}: {node['class_type']} (node {node_id}) never moved the progress bar"
            )
        if node["class_type"] == "SaveImage":
            image = shown["images"][0]
            assert (server.base_dir / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0
        elif node["class_type"] in SAVE_MODEL_NODES:
            saved = pathlib.Path(shown["text"][0])
            assert saved.is_relative_to(server.base_dir / "models") and saved.stat().st_size > 0
            assert saved.stem == node["inputs"]["filename"]
        elif node["class_type"] == "PreviewAny":
            assert shown["text"][0].strip(), f"{name}: empty preview of node {node_id}"


def test_long_running_nodes_exist(pack_nodes):
    assert LONG_RUNNING <= set(pack_nodes)


def test_node_error_reaches_the_ui_as_one_readable_message(page, server):
    """A user mistake (saving a model that was never quantized) shows the node's one-sentence message in
    ComfyUI's error dialog, not a bare traceback."""
    prompt = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"},
        },
        "2": {
            "class_type": "SaveInt8Model",
            "inputs": {"model": ["1", 0], "filename": "never", "overwrite": False},
        },
    }
    end = page.wait_for_end(server.queue_prompt(prompt, client_id=page.client_id))
    assert end["type"] == "execution_error" and end["node_type"] == "SaveInt8Model"
    assert end["exception_type"] == "ValueError"
    message = end["exception_message"].strip()
    assert message.startswith("This model has no INT8 layers") and "\n" not in message and len(message) < 300
    dialog_text = page.page.get_by_text(message, exact=False).first
    dialog_text.wait_for(state="visible", timeout=10_000)
    page.screenshot(ARTIFACTS_DIR / "error_dialog.png")
    page.page.keyboard.press("Escape")
    assert not (server.base_dir / "models" / "diffusion_models" / "never.safetensors").exists()
