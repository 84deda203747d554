"""The W8A8 Linear module: int8 weight + per-channel scale (+ smoothing vector), run through ``kernels``."""

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from ..kernels import w8a8_linear
from .int8_weights import dequantize_weight, quantize_weight_per_channel

_ACTIVE_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar(
    "dit_quant_int8_backend", default="auto"
)


@contextlib.contextmanager
def kernel_backend(backend: str) -> Iterator[None]:
    """Within this context every ``Int8Linear`` runs on ``backend`` ("auto", "triton" or "torch")."""
    token = _ACTIVE_BACKEND.set(backend)
    try:
        yield
    finally:
        _ACTIVE_BACKEND.reset(token)


# torch.compile cannot trace ContextVar.get(): it takes the backend active when the model is traced as a
# constant (a later kernel_backend() around the compiled model does not re-trace it).
@torch.compiler.assume_constant_result
def active_backend() -> str:
    """The backend set by the innermost ``kernel_backend`` context ("auto" outside any)."""
    return _ACTIVE_BACKEND.get()


class Int8Linear(torch.nn.Module):
    """y = W8A8(x): x [..., K] in the compute dtype → [..., N] in the same dtype.

    Parameters (all ``requires_grad=False``): ``weight`` int8 [N, K], ``weight_scale`` fp32 [N],
    optional ``smooth`` fp32 [K] (inputs are divided by it inside activation quantization) and
    optional ``bias`` [N] in the compute dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        smooth: bool = False,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        frozen = dict(requires_grad=False)
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), **frozen
        )
        self.weight_scale = torch.nn.Parameter(
            torch.empty(out_features, dtype=torch.float32, device=device), **frozen
        )
        self.smooth = (
            torch.nn.Parameter(torch.empty(in_features, dtype=torch.float32, device=device), **frozen)
            if smooth
            else None
        )
        self.bias = (
            torch.nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), **frozen)
            if bias
            else None
        )

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None
    ) -> "Int8Linear":
        """Quantizes a float weight [N, K] per output channel (after multiplying by ``smooth`` [K])."""
        q, scale = quantize_weight_per_channel(weight, smooth)
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.in_features, module.out_features = weight.shape[1], weight.shape[0]
        module.set_quantized(q, scale, smooth=smooth, bias=bias)
        return module

    def set_quantized(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        smooth: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Installs already-quantized tensors (int8 [N, K], fp32 [N], fp32 [K] or None, [N] or None)."""
        n, k = weight.shape
        if weight.dtype != torch.int8:
            raise ValueError(f"INT8 layer weight must be int8, got {weight.dtype}")
        if weight_scale.numel() == 1:
            weight_scale = weight_scale.reshape(1).expand(n)
        if weight_scale.shape != (n,):
            raise ValueError(f"weight_scale shape {tuple(weight_scale.shape)} does not match N={n}")
        if smooth is not None and smooth.shape != (k,):
            raise ValueError(f"smoothing vector shape {tuple(smooth.shape)} does not match K={k}")
        if bias is not None and bias.shape != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match N={n}")

        def frozen(t: torch.Tensor | None) -> torch.nn.Parameter | None:
            return None if t is None else torch.nn.Parameter(t, requires_grad=False)

        self.in_features, self.out_features = k, n
        self.weight = frozen(weight.contiguous())
        self.weight_scale = frozen(weight_scale.float().contiguous())
        self.smooth = frozen(None if smooth is None else smooth.float().contiguous())
        self.bias = frozen(bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer computes with (in the un-smoothed input space)."""
        return dequantize_weight(self.weight, self.weight_scale, self.smooth, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(
            x, self.weight, self.weight_scale, self.bias, self.smooth, backend=active_backend()
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, smooth={self.smooth is not None}"
        )
