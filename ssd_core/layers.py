"""Small building blocks of the SSD network: the L2Norm layer and feature-map size arithmetic."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

# The paper scales conv4_3's per-location feature norm to 20 and learns the scale from there
# (ParseNet, Liu et al. 2015, section 3.3), because conv4_3 activations are much larger than the
# deeper sources' and would dominate the shared loss otherwise.
L2NORM_INIT_SCALE = 20.0


def _l2norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``y = w * x / (||x|| + eps)`` over dim 1; also returns ``1 / (||x|| + eps)`` [B, 1, H, W] and ``w`` [1, C, 1, 1].

    The norm is accumulated in at least float32 whatever the input dtype; everything full-size stays in
    ``x``'s dtype and memory format, and ``y`` is the only full-size tensor written.
    """
    accumulate = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16 inputs
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=accumulate)  # [B, 1, H, W]
    # 1 / eps overflows fp16 (an all-zero location would give 0 * inf = NaN): clamp to the dtype's range.
    inv_norm = norm.add_(eps).reciprocal_().clamp_max_(torch.finfo(x.dtype).max).to(x.dtype)  # [B, 1, H, W]
    scale = weight.to(x.dtype).view(1, -1, 1, 1)  # [1, C, 1, 1]
    return torch.mul(x, inv_norm).mul_(scale), inv_norm, scale


class _L2NormFunction(torch.autograd.Function):
    """L2Norm with a hand-written backward: 3 full-size passes forward instead of 4, fewer temporaries
    backward, and only ``x`` (alive anyway) kept for it. With ``u = x / n`` (n = ||x|| + eps per location)
    and ``g = w * dy``: ``dx = (g - u * <u, g>_c) / n`` and ``dw = sum_{b,h,w} dy * u``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, inv_norm, scale = _l2norm_forward(x, weight, eps)
        ctx.save_for_backward(x, inv_norm, scale)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, Tensor, None]:
        x, inv_norm, scale = ctx.saved_tensors
        unit = x * inv_norm  # [B, C, H, W]
        grad_weight = torch.sum(grad_y * unit, dim=(0, 2, 3), dtype=torch.promote_types(x.dtype, torch.float32))
        grad_scaled = grad_y * scale  # [B, C, H, W]
        along = torch.sum(grad_scaled * unit, dim=1, keepdim=True)  # [B, 1, H, W]
        grad_x = torch.addcmul(grad_scaled, unit, along, value=-1).mul_(inv_norm)
        return grad_x, grad_weight.to(ctx.weight_dtype), None


class L2Norm(nn.Module):
    """Normalise each location's channel vector to unit L2 norm, then scale it per channel.

    ``y[b, c, h, w] = weight[c] * x[b, c, h, w] / (||x[b, :, h, w]||_2 + eps)``, with ``weight`` learnable
    and initialised to ``init_scale``. The norm is accumulated in float32 whatever the input dtype, so
    the layer is accurate under bf16/fp16 autocast; the output keeps the input's dtype and memory format.
    Training uses a hand-written backward (``_L2NormFunction``); without autograd (inference, export)
    it is plain tensor operations.

    Args:
        channels: C, the number of input channels.
        init_scale: initial value of every per-channel scale (the paper: 20).
        eps: added to the norm so an all-zero location (common after ReLU) maps to zero, not NaN.
    """

    def __init__(self, channels: int, init_scale: float = L2NORM_INIT_SCALE, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init_scale)))
        self.init_scale = float(init_scale)
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init_scale)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W]
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _L2NormFunction.apply(x, self.weight, self.eps)
        return _l2norm_forward(x, self.weight, self.eps)[0]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, init_scale={self.init_scale}, eps={self.eps}"


# Modules that never change the spatial size of their input.
_SIZE_PRESERVING = (nn.ReLU, nn.BatchNorm2d, nn.Identity, L2Norm)


def _pair_is_square(value: int | tuple[int, ...], what: str, module: nn.Module) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"{module}: expected a square {what}, got {value}")
    return int(value[0])


def output_side(layers: Iterable[nn.Module], side: int) -> int:
    """Side of the square feature map that ``layers``, applied in order, make from a ``side x side`` input.

    Uses the convolution/pooling arithmetic ``floor_or_ceil((s + 2p - d(k - 1) - 1) / stride) + 1``, so it
    costs nothing even for SSD512; it knows Conv2d, MaxPool2d, nn.Sequential and size-preserving layers.
    """
    for module in layers:
        if isinstance(module, nn.Sequential):
            side = output_side(module, side)
        elif isinstance(module, nn.Conv2d | nn.MaxPool2d):
            if isinstance(module.padding, str):
                raise ValueError(f"{module}: give integer padding, got {module.padding!r}")
            k = _pair_is_square(module.kernel_size, "kernel", module)
            stride = _pair_is_square(module.stride, "stride", module)
            pad = _pair_is_square(module.padding, "padding", module)
            dilation = _pair_is_square(module.dilation, "dilation", module)
            span = (side + 2 * pad - dilation * (k - 1) - 1) / stride
            ceil = isinstance(module, nn.MaxPool2d) and module.ceil_mode
            side = (math.ceil(span) if ceil else math.floor(span)) + 1
        elif isinstance(module, _SIZE_PRESERVING):
            continue
        else:
            raise TypeError(f"output_side: does not know how {type(module).__name__} changes the spatial size")
        if side <= 0:
            raise ValueError(f"output_side: {module} leaves no spatial extent (side {side})")
    return side
