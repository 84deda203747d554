"""A real ComfyUI server process with the pack installed, and a headless Chromium page on its web UI.

The server is ComfyUI's own ``main.py`` (``$COMFYUI_PATH`` or ``.cache/ComfyUI``) started as a background
process on a free port, with ``--base-directory`` pointing at a temporary folder that holds its models,
custom nodes (the pack is symlinked in under the folder name users clone it into), inputs and outputs.

The browser is Debian's ``chromium`` (scripts/install_browser.sh; ``$DIT_QUANT_CHROMIUM`` overrides the
path) driven by Playwright; Playwright's own browser downloads are never used. Workflows are loaded through
the page's own path (``app.loadGraphData``) after fetching them from the URL ComfyUI serves a custom node's
``example_workflows/`` under, the same URL its template browser uses.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

from comfy_harness import PACK_FOLDER_NAME, REPO_ROOT, comfy_root

SERVER_START_TIMEOUT_S = 120.0
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Our nodes' registration is the page's signal that the frontend has loaded the server's node list.
PAGE_READY_JS = "!!(window.app?.graph && window.LiteGraph?.registered_node_types?.Int8KernelPatch)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium_path() -> str:
    """The Chromium executable: ``$DIT_QUANT_CHROMIUM``, else ``chromium`` on PATH; raises if none."""
    path = os.environ.get("DIT_QUANT_CHROMIUM") or shutil.which("chromium")
    if not path:
        raise RuntimeError(
            "no chromium found: run scripts/install_browser.sh (Debian) or set DIT_QUANT_CHROMIUM"
        )
    return path


@dataclass
class ComfyServer:
    """A running ComfyUI server process; ``stop()`` ends it (only this process, by its pid)."""

    base_dir: pathlib.Path
    port: int
    process: subprocess.Popen
    log_path: pathlib.Path
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def request(self, path: str, body=None, timeout: float = 30.0) -> tuple[int, object]:
        """GET (body None) or POST JSON to the server; returns (HTTP status, decoded JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get_json(self, path: str):
        status, payload = self.request(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {payload}")
        return payload

    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """POSTs an API-format graph to /prompt for ``client_id`` (default: this harness's own id); returns
        its prompt id. Raises with the node errors when the server rejects the graph (HTTP 400)."""
        status, payload = self.request(
            "/prompt", {"prompt": prompt, "client_id": client_id or self.client_id}
        )
        if status != 200:
            raise RuntimeError(
                f"POST /prompt rejected the graph (HTTP {status}): {json.dumps(payload)[:3000]}"
            )
        return payload["prompt_id"]

    def wait_for_prompt(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Polls /history until the prompt finished; returns its history entry. Raises on error or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    errors = [
                        data for event, data in status.get("messages", []) if event == "execution_error"
                    ]
                    raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(errors)[:3000]}")
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited (code {self.process.returncode}):\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def prepare_base_dir(
    base_dir: pathlib.Path, extra_custom_nodes: dict[str, str] | None = None, link_pack: bool = True
) -> pathlib.Path:
    """Creates a ComfyUI base directory: model/input/output folders, the pack symlinked into custom_nodes
    (unless ``link_pack`` is false) and, for each ``{folder: init_source}`` of ``extra_custom_nodes``, a
    custom node folder with that ``__init__.py``."""
    for sub in (
        "models/diffusion_models",
        "models/vae",
        "models/text_encoders",
        "models/loras",
        "custom_nodes",
        "input",
        "output",
        "temp",
        "user",
    ):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / PACK_FOLDER_NAME
    if link_pack and not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    for folder, init_source in (extra_custom_nodes or {}).items():
        (base_dir / "custom_nodes" / folder).mkdir(exist_ok=True)
        (base_dir / "custom_nodes" / folder / "__init__.py").write_text(init_source)
    return base_dir


def start_server(
    base_dir: pathlib.Path,
    python: str = sys.executable,
    comfyui: pathlib.Path | None = None,
    timeout: float = SERVER_START_TIMEOUT_S,
) -> ComfyServer:
    """Starts ``python main.py --cpu`` of ComfyUI on a free port with ``base_dir`` as its base directory and
    waits until it answers. Raises with the end of its log if it exits or does not answer in time."""
    comfyui = comfyui or comfy_root()
    port = free_port()
    log_path = base_dir / "server.log"
    command = [
        python,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-api-nodes",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the server runs like a user's
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(base_dir=base_dir, port=port, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"ComfyUI exited during start-up (code {process.returncode}):\n{server.log_tail()}"
            )
        try:
            if server.request("/system_stats", timeout=2)[0] == 200:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    server.stop()
    raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{server.log_tail()}")


# What every page load here produces and what says nothing about the pack: 404s for per-user files that a
# fresh base directory lacks (user.css, userdata listings, the templates index; the failed request is also
# logged to the console as "Failed to load resource"), and requests to Comfy's cloud API that the page's
# content security policy blocks on an offline machine.
HARMLESS_HTTP_PATHS = ("/api/userdata", "/user.css", "/templates/")
HARMLESS_CONSOLE_ERRORS = (
    "Failed to load resource: the server responded with a status of 404",
    "Connecting to 'https://api.comfy.org/",
)
# Only on the first load of the app: the frontend's own TypeError in its start-up code, and the core
# templates package (comfyui-workflow-templates, optional) not being installed.
FIRST_LOAD_NOISE = (
    "TypeError: Cannot read properties of undefined (reading 'id')\n    at onChange",
    "Error loading core workflow templates",
)


# Server messages the page receives over its websocket for prompts queued with its client id.
RECORDED_EVENTS = ("progress", "execution_error", "execution_success")
RECORD_EVENTS_JS = """(types) => {
    window.__ditQuantEvents = [];
    for (const type of types)
        app.api.addEventListener(type, (event) => window.__ditQuantEvents.push({type, ...event.detail}));
}"""


class ComfyPage:
    """The ComfyUI web app in a headless Chromium page; records page errors, console errors and failed
    HTTP requests. ``startup_errors`` are those of opening the app, beyond the known noise."""

    def __init__(self, browser, server: ComfyServer, viewport=(1920, 1080)):
        self.server = server
        # A returning user's view: no first-run templates dialog, no "Nodes 2.0" banner, and no minimap
        # covering a corner of the graph in screenshots; full node detail at every zoom level, so that
        # screenshots of large graphs stay legible.
        server.request(
            "/settings",
            {
                "Comfy.TutorialCompleted": True,
                "Comfy.Minimap.Visible": False,
                "LiteGraph.Canvas.MinFontSizeForLOD": 0,
            },
        )
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("response", self._record_http_error)
        self.page.goto(server.url + "/")
        self.page.wait_for_function(PAGE_READY_JS, timeout=90_000)
        self.evaluate(RECORD_EVENTS_JS, list(RECORDED_EVENTS))
        self.startup_errors = [e for e in self.unexpected_errors() if not e.startswith(FIRST_LOAD_NOISE)]
        self.clear_errors()

    def _record_http_error(self, response) -> None:
        path = urllib.parse.urlsplit(response.url).path
        if response.status >= 400 and not path.startswith(HARMLESS_HTTP_PATHS):
            self.errors.append(f"HTTP {response.status} {response.url}")

    def unexpected_errors(self) -> list[str]:
        """Errors recorded since the last ``clear_errors()``, other than the known harmless ones."""
        return [e for e in self.errors if not e.startswith(HARMLESS_CONSOLE_ERRORS)]

    def clear_errors(self) -> None:
        self.errors.clear()

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def load_template(self, pack_folder: str, name: str) -> dict:
        """Fetches ``/api/workflow_templates/<pack_folder>/<name>.json`` in the page and loads it with
        ``app.loadGraphData`` (the template browser's path). Returns the workflow as served."""
        return self.evaluate(
            """async ([folder, name]) => {
            const response = await fetch(`/api/workflow_templates/${folder}/${name}.json`);
            if (!response.ok) throw new Error(`template ${name}: HTTP ${response.status}`);
            const workflow = await response.json();
            await app.loadGraphData(workflow, true, true, name);
            return workflow;
        }""",
            [pack_folder, name],
        )

    def missing_node_types(self) -> list[str]:
        """Types of loaded nodes the frontend does not know: the "missing nodes" a user would be shown."""
        return self.evaluate("""() => [...new Set(app.graph._nodes.map(n => n.type)
            .filter(t => !(t in LiteGraph.registered_node_types)))]""")

    def node_widgets(self) -> list[dict]:
        """For every node of the loaded graph: id, type, title, and its widgets as {name: value}."""
        return self.evaluate("""() => app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
            widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}))""")

    def new_node_widgets(self, node_type: str) -> dict:
        """Widget {name: value} of a freshly created node of ``node_type`` (not added to the graph)."""
        return self.evaluate(
            """(type) => {
            const node = LiteGraph.createNode(type);
            if (!node) throw new Error(`cannot create node ${type}`);
            return Object.fromEntries((node.widgets || []).map(w => [w.name, w.value]));
        }""",
            node_type,
        )

    @property
    def client_id(self) -> str:
        """The page's websocket client id: prompts queued with it report progress and errors to this page."""
        return self.evaluate("() => app.api.clientId")

    def events(self, prompt_id: str) -> list[dict]:
        """Recorded server messages (``RECORDED_EVENTS``) about ``prompt_id``: {"type", **message data}."""
        return self.evaluate("(id) => window.__ditQuantEvents.filter(e => e.prompt_id === id)", prompt_id)

    def wait_for_end(self, prompt_id: str, timeout_s: float = 60.0) -> dict:
        """Waits until the page heard that ``prompt_id`` succeeded or failed; returns that message."""
        self.page.wait_for_function(
            """(id) => window.__ditQuantEvents.some(e => e.prompt_id === id &&
            (e.type === 'execution_success' || e.type === 'execution_error'))""",
            arg=prompt_id,
            timeout=timeout_s * 1000,
        )
        return [e for e in self.events(prompt_id) if e["type"] != "progress"][-1]

    def graph_to_prompt(self) -> dict:
        """The API-format prompt the Queue button would send (``app.graphToPrompt().output``)."""
        return self.evaluate("async () => (await app.graphToPrompt()).output")

    def screenshot(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.wait_for_timeout(300)  # let the canvas draw the loaded graph
        self.page.screenshot(path=str(path))

    def close(self) -> None:
        self.context.close()
