"""A Gaussian-mixture bias (GMM): bias[h, i, j] = Σ_k w[h, k] · exp(−d²(i, j) / (2σ[h, k]²)) over
the patch grid (token 0, the class token, gets 0), built dense by one launch; its gradient is
reduced against the K Gaussians inside the shared-gradient pass (`shared.py`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import on_device
from . import common


@triton.jit
def gmm_sq_dist(rows, cols, grid):
    """(‖pos_i − pos_j‖² in patches as fp32, whether both are patches) for token indices rows ×
    cols: token t ≥ 1 is patch t − 1 of a grid-wide square grid, row-major; token 0 is none."""
    pr = tl.maximum(rows - 1, 0)
    pc = tl.maximum(cols - 1, 0)
    dy = (pr // grid)[:, None] - (pc // grid)[None, :]
    dx = (pr % grid)[:, None] - (pc % grid)[None, :]
    return (dy * dy + dx * dx).to(tl.float32), (rows >= 1)[:, None] & (cols >= 1)[None, :]


@triton.jit
def gmm_gaussian(GMM_W, GMM_LS, h, kk, d2, GMM_KERNELS: tl.constexpr):
    """(weight[h, kk], 1 / σ[h, kk]², exp(−d2 / (2σ[h, kk]²))) of Gaussian kk of head h."""
    w = tl.load(GMM_W + h * GMM_KERNELS + kk).to(tl.float32)
    inv_var = tl.exp(-2.0 * tl.load(GMM_LS + h * GMM_KERNELS + kk).to(tl.float32))
    return w, inv_var, tl.math.exp2(d2 * (inv_var * (-0.5 * 1.4426950408889634)))


@triton.jit
def attention_gmm_bias_kernel(GMM_W, GMM_LS, BIAS, N, grid, GMM_KERNELS: tl.constexpr, BLOCK: tl.constexpr):
    """The dense [H, N, N] fp32 bias: one program per (BLOCK × BLOCK tile, head)."""
    tiles_n = tl.cdiv(N, BLOCK)
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = (t // tiles_n) * BLOCK + tl.arange(0, BLOCK)
    cols = (t % tiles_n) * BLOCK + tl.arange(0, BLOCK)
    d2, patches = gmm_sq_dist(rows, cols, grid)
    bias = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for kk in tl.static_range(GMM_KERNELS):
        w, inv_var, g = gmm_gaussian(GMM_W, GMM_LS, h, kk, d2, GMM_KERNELS)
        bias += w * g
    ok = (rows < N)[:, None] & (cols < N)[None, :]
    tl.store(BIAS + h * N * N + rows[:, None] * N + cols[None, :], tl.where(patches, bias, 0.0), mask=ok)


def gaussian_mixture_bias(weight: Tensor, log_sigma: Tensor, grid_size: int) -> Tensor:
    """The dense [H, 1 + grid_size², 1 + grid_size²] fp32 bias of a Gaussian mixture (one launch)."""
    H, kernels = weight.shape
    N = 1 + grid_size * grid_size
    bias = common.new_buffer((H, N, N), device=weight.device, dtype=torch.float32)
    block = 32
    with on_device(weight):
        attention_gmm_bias_kernel[(triton.cdiv(N, block) ** 2, H)](
            weight.contiguous(), log_sigma.contiguous(), bias, N, grid_size, GMM_KERNELS=kernels, BLOCK=block,
        )
    return bias
