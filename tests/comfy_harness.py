"""A real ComfyUI, in-process, for the tests: the pack loaded through ComfyUI's own custom-node loader,
tiny diffusion models built from ComfyUI's own model classes, and graphs run by the real PromptExecutor.

ComfyUI comes from ``$COMFYUI_PATH`` if set (a user's checkout), else from ``.cache/ComfyUI`` made by
scripts/setup.sh (v0.3.75 from the package registry).

Text encoders cannot be had offline at any size, so graphs get their conditioning from
``DiTQuantTestConditioning`` (registered here, test-only): seeded random text tokens and pooled vector
with the shapes the model expects. Everything downstream — loaders, KSampler, our nodes — is real.
"""

import asyncio
import os
import pathlib
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "ComfyUI-DiT-Quant"  # any folder name works; this is the one users clone into


def comfy_root() -> pathlib.Path:
    root = pathlib.Path(os.environ.get("COMFYUI_PATH", REPO_ROOT / ".cache" / "ComfyUI"))
    if not (root / "nodes.py").is_file():
        raise RuntimeError(
            f"no ComfyUI at {root}: run scripts/setup.sh or set COMFYUI_PATH to a ComfyUI checkout"
        )
    return root


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@dataclass
class TinyModelSpec:
    """A tiny DiT of one family, built from ComfyUI's own model class.

    sd3: MMDiT; ComfyUI derives hidden = 64·depth and heads = depth from the weights.
    wan: Wan 2.1 text-to-video; hidden = width (heads = width / 128), FFN width ``ffn``.
    flux: Flux (schnell layout, no guidance embedder); hidden = width, heads = width / 128, ``depth`` double
    and ``depth`` single blocks, MLP ratio 4. Built in memory only: ComfyUI 0.3.75's detection assumes 24
    heads, so a file of this model does not load through UNETLoader (tests/test_fused_flux.py).
    """

    family: str = "sd3"
    depth: int = 2
    width: int = 128
    ffn: int = 256
    in_channels: int = 16
    patch_size: int = 2
    context_tokens: int = 8
    pos_embed_max_size: int = 16

    @property
    def context_dim(self) -> int:
        return {"sd3": 64, "wan": 4096, "flux": 64}[self.family]

    @property
    def pooled_dim(self) -> int:
        return {"sd3": 32, "wan": 0, "flux": 32}[self.family]

    def latent_node(self, size: int) -> dict:
        if self.family == "wan":
            return {
                "class_type": "EmptyHunyuanLatentVideo",
                "inputs": {"width": size, "height": size, "length": 1, "batch_size": 1},
            }
        return {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": size, "height": size, "batch_size": 1},
        }


class TestConditioning:
    """Test-only node: seeded random conditioning shaped like a text encoder's output."""

    CATEGORY = "DiT Quant/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0}),
                "tokens": ("INT", {"default": 8}),
                "context_dim": ("INT", {"default": 64, "max": 1 << 16}),
                "pooled_dim": ("INT", {"default": 32, "max": 1 << 16}),
            }
        }

    def make(self, seed: int, tokens: int, context_dim: int, pooled_dim: int):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=g)
        extra = {"pooled_output": torch.randn(1, pooled_dim, generator=g)} if pooled_dim else {}
        return ([[context, extra]],)


class _ServerStandIn:
    """What PromptExecutor needs of the server: progress messages go nowhere."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass


@dataclass
class Comfy:
    root: pathlib.Path
    base_dir: pathlib.Path
    pack: Any
    nodes: Any
    modules: dict = field(default_factory=dict)

    @property
    def diffusion_models_dir(self) -> pathlib.Path:
        return self.base_dir / "models" / "diffusion_models"

    def run(self, prompt: dict, executor: Any = None) -> dict:
        """Validates and executes an API-format graph; returns {node_id: ui outputs}. Raises on failure.

        executor: one from :meth:`new_executor`, to run several graphs the way the server does: ComfyUI's
        output cache then keeps nodes whose inputs did not change from running again.
        """
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise RuntimeError(f"graph rejected: {valid[1]} {valid[3]}")
        executor = executor or self.new_executor()
        executor.execute(prompt, prompt_id, {}, valid[2])
        if not executor.success:
            errors = [m for m in executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(f"graph failed: {errors}")
        return executor.history_result["outputs"]

    @staticmethod
    def new_executor() -> Any:
        """A PromptExecutor with ComfyUI's default (classic) output cache."""
        import execution

        return execution.PromptExecutor(_ServerStandIn(), cache_args={"lru": 0, "ram": 0})

    @staticmethod
    def cached_nodes(executor: Any) -> list[str]:
        """The nodes the executor's last graph took from its cache instead of running them."""
        messages = executor.status_messages
        return [n for event, data in messages if event == "execution_cached" for n in data["nodes"]]

    def module(self, name: str):
        """A pack module as ComfyUI imported it, e.g. ``comfy.module("quant.int8_linear")``."""
        import importlib

        return importlib.import_module(f"{self.pack.__name__}.{name}")

    def run_node(self, class_name: str, **inputs) -> tuple:
        """Calls one node's function directly (for inputs that cannot be expressed in a graph)."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[class_name]
        return getattr(cls(), cls.FUNCTION)(**inputs)


_COMFY: Comfy | None = None


def load_comfy(base_dir: pathlib.Path) -> Comfy:
    """Imports ComfyUI (CPU), registers model folders in ``base_dir``, loads the pack as ComfyUI does."""
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    root = comfy_root()
    sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
    args.bf16_unet = True  # diffusion models compute in bf16, as on a GPU (ComfyUI's CPU default is fp32)
    import folder_paths
    import utils.extra_config  # noqa: F401  (must precede `import nodes`, which shadows `utils`)

    import nodes

    for sub in ("checkpoints", "loras", "diffusion_models"):  # "unet" is a legacy alias of diffusion_models
        (base_dir / "models" / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(sub, str(base_dir / "models" / sub), is_default=True)
    for sub in ("output", "input", "temp"):
        (base_dir / sub).mkdir(exist_ok=True)
    folder_paths.set_output_directory(str(base_dir / "output"))
    folder_paths.set_input_directory(str(base_dir / "input"))
    folder_paths.set_temp_directory(str(base_dir / "temp"))

    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_FOLDER_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    asyncio.run(nodes.init_builtin_extra_nodes())
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(link)))
    if not ok:
        raise RuntimeError("ComfyUI failed to load the pack (see the log above)")
    loaded = set(nodes.NODE_CLASS_MAPPINGS) - before
    register_test_nodes(nodes)
    # ComfyUI registers a pack folder under its full path as the module name.
    _COMFY = Comfy(
        root=root,
        base_dir=base_dir,
        pack=sys.modules[str(link).replace(".", "_x_")],
        nodes=nodes,
        modules={"loaded_node_classes": sorted(loaded)},
    )
    return _COMFY


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Fresh random weights (never zeros): fan-in scaled for matrices, small values for vectors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(module.named_parameters()) + [
            (n, b) for n, b in module.named_buffers() if b.is_floating_point()
        ]
        for _, p in sorted(tensors, key=lambda item: item[0]):
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            std = fan_in**-0.5 if p.ndim >= 2 else 0.02
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def build_tiny_model(
    spec: TinyModelSpec, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> torch.nn.Module:
    """A random-weight diffusion model of ``spec.family`` from ComfyUI's own class."""
    import comfy.ops

    common = {"dtype": torch.float32, "device": "cpu", "operations": comfy.ops.disable_weight_init}
    if spec.family == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

        hidden = 64 * spec.depth
        model = MMDiT(
            input_size=None,
            patch_size=spec.patch_size,
            in_channels=spec.in_channels,
            depth=spec.depth,
            adm_in_channels=spec.pooled_dim,
            out_channels=spec.in_channels,
            context_embedder_config={
                "target": "torch.nn.Linear",
                "params": {"in_features": spec.context_dim, "out_features": hidden},
            },
            pos_embed_max_size=spec.pos_embed_max_size,
            num_patches=spec.pos_embed_max_size**2,
            pos_embed_scaling_factor=None,
            **common,
        )
    elif spec.family == "wan":
        from comfy.ldm.wan.model import WanModel

        model = WanModel(
            model_type="t2v",
            in_dim=spec.in_channels,
            out_dim=spec.in_channels,
            dim=spec.width,
            ffn_dim=spec.ffn,
            num_heads=spec.width // 128,
            num_layers=spec.depth,
            text_dim=spec.context_dim,
            image_model="wan2.1",
            **common,
        )
    elif spec.family == "flux":
        from comfy.ldm.flux.model import Flux

        model = Flux(
            in_channels=spec.in_channels,
            out_channels=spec.in_channels,
            vec_in_dim=spec.pooled_dim,
            context_in_dim=spec.context_dim,
            hidden_size=spec.width,
            mlp_ratio=4.0,
            num_heads=spec.width // 128,
            depth=spec.depth,
            depth_single_blocks=spec.depth,
            axes_dim=[16, 56, 56],
            theta=10000,
            patch_size=spec.patch_size,
            qkv_bias=True,
            guidance_embed=False,
            **common,
        )
    else:
        raise ValueError(f"unknown tiny model family {spec.family!r}")
    init_random_(model, seed)
    return model.to(dtype)


def tiny_flux_patcher(state_dict: dict, heads: int | None = None) -> Any:
    """A ComfyUI ModelPatcher of a tiny Flux state dict, built as comfy.sd.load_diffusion_model_state_dict
    does.

    Not through UNETLoader: ComfyUI 0.3.75's model detection hard-codes num_heads=24 for Flux, so a
    256-wide file fails to load ("Hidden size 256 must be divisible by num_heads 24"); the detected
    config gets the tiny model's head count (default hidden / 128) instead, everything else is ComfyUI's.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    assert unet_config["image_model"] == "flux", unet_config
    unet_config["num_heads"] = heads or unet_config["hidden_size"] // 128
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, state_dict)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model(state_dict, "")
    model.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def ksampler_latent(comfy: "Comfy", model: Any, spec: TinyModelSpec, seed: int) -> torch.Tensor:
    """ComfyUI's KSampler node (euler, 2 steps, cfg 3) on a 64x64 image's latent with seeded test
    conditioning of ``spec``'s shapes (calls the node functions directly, for in-memory models, under
    torch.inference_mode like ComfyUI's executor)."""
    def conditioning(cond_seed):
        (cond,) = comfy.run_node("DiTQuantTestConditioning", seed=cond_seed, tokens=spec.context_tokens,
                                 context_dim=spec.context_dim, pooled_dim=spec.pooled_dim)
        return cond

    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        (latent,) = comfy.run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
        (out,) = comfy.run_node("KSampler", model=model, seed=seed, steps=2, cfg=3.0, sampler_name="euler",
                                scheduler="simple", positive=conditioning(11), negative=conditioning(12),
                                latent_image=latent, denoise=1.0)
        return out["samples"].detach().clone()


def save_tiny_model(
    path: pathlib.Path, spec: TinyModelSpec | None = None, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> pathlib.Path:
    """Writes a tiny model's state dict (ComfyUI diffusion-model keys) as safetensors."""
    from safetensors.torch import save_file

    model = build_tiny_model(spec or TinyModelSpec(), seed, dtype)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path




def save_random_lora(
    path: pathlib.Path,
    layer_shapes: dict[str, tuple[int, int]],
    rank: int = 4,
    seed: int = 0,
    std: float = 0.05,
    alpha: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Writes a LoRA in the generic key format (``diffusion_model.<layer>.lora_up/lora_down.weight``, and
    ``.alpha`` when given) with seeded random factors for layers {name: (N, K)}; returns the file name."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (n, k) in layer_shapes.items():
        prefix = f"diffusion_model.{layer}"
        tensors[f"{prefix}.lora_up.weight"] = (torch.randn(n, rank, generator=g) * std).to(dtype)
        tensors[f"{prefix}.lora_down.weight"] = (torch.randn(rank, k, generator=g) * std).to(dtype)
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path.name


def sampling_graph(
    model_node: list | dict,
    *,
    seed: int = 1,
    steps: int = 2,
    size: int = 64,
    spec: TinyModelSpec | None = None,
    extra: dict | None = None,
) -> dict:
    """API-format graph: conditioning → KSampler(model) → latent output node "save" (SaveLatent)."""
    spec = spec or TinyModelSpec()
    graph = {
        "pos": {
            "class_type": "DiTQuantTestConditioning",
            "inputs": {
                "seed": 11,
                "tokens": spec.context_tokens,
                "context_dim": spec.context_dim,
                "pooled_dim": spec.pooled_dim,
            },
        },
        "neg": {
            "class_type": "DiTQuantTestConditioning",
            "inputs": {
                "seed": 12,
                "tokens": spec.context_tokens,
                "context_dim": spec.context_dim,
                "pooled_dim": spec.pooled_dim,
            },
        },
        "latent": spec.latent_node(size),
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": model_node,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 3.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "save": {"class_type": "DiTQuantTestCaptureLatent", "inputs": {"samples": ["sample", 0]}},
    }
    graph.update(extra or {})
    return graph


def load_int8_graph(unet_name: str, backend: str = "torch") -> dict:
    """API-format nodes: LoadInt8DiffusionModel "load" → Int8KernelPatch "patch" (``backend``)."""
    return {
        "load": {"class_type": "LoadInt8DiffusionModel", "inputs": {"unet_name": unet_name}},
        "patch": {"class_type": "Int8KernelPatch", "inputs": {"model": ["load", 0], "backend": backend}},
    }


def quantize_and_save_int8(comfy: "Comfy", unet_name: str, filename: str) -> pathlib.Path:
    """Runs UNETLoader(unet_name) → QuantizeModelInt8 → SaveInt8Model(filename, overwrite) through the
    executor; returns the written file's path."""
    comfy.run(
        {
            "load": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": unet_name, "weight_dtype": "default"},
            },
            "quant": {"class_type": "QuantizeModelInt8", "inputs": {"model": ["load", 0], "keep_layers": ""}},
            "save": {
                "class_type": "SaveInt8Model",
                "inputs": {"model": ["quant", 0], "filename": filename, "overwrite": True},
            },
        }
    )
    return comfy.diffusion_models_dir / f"{filename}.safetensors"


def sample_latent(comfy: "Comfy", model_nodes: dict, model_ref: list, **graph_options) -> torch.Tensor:
    """Runs ``sampling_graph(model_ref, extra=model_nodes, **graph_options)`` through the executor and
    returns the sampled latent."""
    CaptureLatent.captured.clear()
    comfy.run(sampling_graph(model_ref, extra=model_nodes, **graph_options))
    assert len(CaptureLatent.captured) == 1
    return CaptureLatent.captured[0]


class CaptureLatent:
    """Test-only output node: keeps the last latent it saw, keyed by prompt, for comparisons."""

    CATEGORY = "DiT Quant/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"
    captured: list[torch.Tensor] = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def capture(self, samples):
        CaptureLatent.captured.append(samples["samples"].detach().clone())
        return {"ui": {"shape": list(samples["samples"].shape)}}


def register_test_nodes(nodes_module) -> None:
    nodes_module.NODE_CLASS_MAPPINGS["DiTQuantTestConditioning"] = TestConditioning
    nodes_module.NODE_CLASS_MAPPINGS["DiTQuantTestCaptureLatent"] = CaptureLatent
