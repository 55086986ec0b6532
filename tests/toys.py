"""Toy models covering every layer kind SVF handles (comparison helpers live in checks.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from checks import reference_weight, relative_error  # noqa: F401  (re-exported: tests import them from here)
from torch import Tensor, nn

import svftune


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers non-trivial running statistics and affine parameters (so frozen BN is tested)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model


def perturb_singular_values(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every S away from S0, as training would, so merge/cache/forms are tested off the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            noise = torch.randn(layer.S.shape, generator=generator, dtype=torch.float64)
            layer.S.mul_((1 + scale * noise).to(layer.S.dtype))


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def _conv_net(conv: nn.Module, channels: int, batchnorm: bool = True) -> nn.Module:
    dims = 3 if isinstance(conv, nn.Conv3d) else 1 if isinstance(conv, nn.Conv1d) else 2
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    layers = [conv] + ([norm(channels)] if batchnorm else []) + [nn.ReLU(), pool(2), Flatten()]
    layers.append(nn.Linear(channels * 2**dims, 5))
    return nn.Sequential(*layers)


# name -> (builder, input shape). Each builder returns a fresh model with random weights.
TOYS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 7)), (6, 12)),
    "mlp_no_bias_tokens": (lambda: nn.Sequential(nn.Linear(9, 9, bias=False), nn.GELU(), nn.Linear(9, 3)), (2, 5, 9)),
    "linear_fan_in_3": (lambda: nn.Sequential(nn.Linear(3, 17), nn.Tanh(), nn.Linear(17, 2)), (4, 3)),
    "conv1d": (lambda: _conv_net(nn.Conv1d(3, 8, 3, padding=1), 8), (2, 3, 16)),
    "conv2d_1x1": (lambda: _conv_net(nn.Conv2d(6, 10, 1), 10), (2, 6, 9, 9)),
    "conv2d_3x3": (lambda: _conv_net(nn.Conv2d(4, 8, 3, padding=1), 8), (2, 4, 10, 10)),
    "conv2d_strided": (lambda: _conv_net(nn.Conv2d(4, 8, 3, stride=2, padding=1), 8), (2, 4, 11, 11)),
    "conv2d_dilated": (lambda: _conv_net(nn.Conv2d(4, 8, 3, padding=2, dilation=2), 8), (2, 4, 12, 12)),
    "conv2d_grouped": (lambda: _conv_net(nn.Conv2d(8, 12, 3, padding=1, groups=4), 12), (2, 8, 8, 8)),
    "conv2d_depthwise": (lambda: _conv_net(nn.Conv2d(6, 6, 3, padding=1, groups=6), 6), (2, 6, 8, 8)),
    "conv2d_depthwise_multiplier": (lambda: _conv_net(nn.Conv2d(4, 8, 3, padding=1, groups=4), 8), (2, 4, 8, 8)),
    "conv2d_odd_kernel": (lambda: _conv_net(nn.Conv2d(5, 7, (3, 2), stride=(1, 2)), 7), (2, 5, 9, 8)),
    "conv2d_rank_from_fan_in": (lambda: _conv_net(nn.Conv2d(2, 16, 1), 16), (2, 2, 6, 6)),
    "conv2d_reflect": (lambda: _conv_net(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), 6), (2, 3, 8, 8)),
    "conv2d_circular": (lambda: _conv_net(nn.Conv2d(3, 6, 3, padding=2, padding_mode="circular"), 6), (2, 3, 7, 7)),
    "conv2d_same_padding": (lambda: _conv_net(nn.Conv2d(3, 6, 4, padding="same"), 6), (2, 3, 7, 7)),
    "conv2d_no_bias_no_bn": (lambda: _conv_net(nn.Conv2d(3, 6, 3, bias=False), 6, batchnorm=False), (2, 3, 8, 8)),
    "conv3d": (lambda: _conv_net(nn.Conv3d(3, 4, 3, padding=1), 4), (2, 3, 6, 6, 6)),
}


def build_toy(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """A toy model with randomized norm statistics, and a random input for it."""
    builder, shape = TOYS[name]
    torch.manual_seed(seed)
    model = randomize_norm_stats(builder(), seed).to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    return model, x
