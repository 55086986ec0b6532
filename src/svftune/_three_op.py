"""The autograd function behind the three-op and lean training forms of the SVF layers (see ``svftune.layers``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast settings in force for ``device_type``, to replay them when recomputing in a backward."""
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return device_type, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return device_type, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class ScaleProject(torch.autograd.Function):
    """``y = U diag(S) z + bias`` along the channel dimension, with ``z = project(x)`` the ``Vh`` projection.

    Autograd's own ``mul`` + ``conv`` pair would also save ``S * z``; this never computes a weight gradient and
    keeps at most one map of ``R`` channels per layer. With ``project=None`` (the three-op form) the input
    already is ``z`` and is saved. With a ``project`` callable (the lean form) only ``x`` is saved, which the
    layer before keeps alive anyway, and ``project`` runs again in the backward (under the forward's autocast
    state): one more ``Vh`` conv per step instead of an ``R``-channel activation map per layer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, u: Tensor, bias: Tensor | None, nd: int, project) -> Tensor:
        recompute = project is not None
        z = project(x) if recompute else x
        groups, out_per_group, rank = u.shape
        scaled = u * s.to(u.dtype).unsqueeze(1)
        if nd == 0:
            y = F.linear(z, scaled[0], bias)
        else:
            y = CONV[nd](z, scaled.reshape(groups * out_per_group, rank, *(1,) * nd), bias, groups=groups)
        ctx.save_for_backward(x if recompute else z, s, u)
        ctx.nd, ctx.project = nd, project
        if recompute:
            ctx.autocast = _autocast_state(x.device.type)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        saved, s, u = ctx.saved_tensors
        nd = ctx.nd
        groups, out_per_group, rank = u.shape
        u = u.to(grad_y.dtype)
        if nd == 0:
            grad_t = grad_y @ u[0]
            sum_dims = tuple(range(grad_y.dim() - 1))
            s_view = s.reshape(rank)
        else:
            grad_t = _CONV_T[nd](grad_y, u.reshape(groups * out_per_group, rank, *(1,) * nd), groups=groups)
            sum_dims = (0, *range(2, 2 + nd))
            s_view = s.reshape(1, groups * rank, *(1,) * nd)
        x_needs_grad = ctx.needs_input_grad[0]
        recompute = ctx.project is not None
        if recompute:
            device_type, enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                x = saved.detach().requires_grad_(x_needs_grad)
                z = ctx.project(x)
        else:
            z = saved
        grad_x = grad_s = grad_bias = None
        if ctx.needs_input_grad[1]:
            accumulate = torch.promote_types(grad_t.dtype, torch.float32)  # half products, fp32 sums
            if recompute and z.dtype == grad_t.dtype:
                with torch.no_grad():  # the recomputed z is ours and its values are not needed again
                    product = z.mul_(grad_t)
            else:
                product = grad_t * z.to(grad_t.dtype)
            grad_s = torch.sum(product, sum_dims, dtype=accumulate).reshape(s.shape).to(s.dtype)
            del product
        if x_needs_grad:
            grad_z = grad_t.mul_(s_view.to(grad_t.dtype))  # grad_t is a fresh map: scale it in place
            # three-op: the Vh projection's own backward runs outside (autograd); lean: run it here
            grad_x = torch.autograd.grad(z, x, grad_z)[0] if recompute else grad_z
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum(sum_dims)
        return grad_x, grad_s, None, grad_bias, None, None
