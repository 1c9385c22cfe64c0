"""Plain-PyTorch twins of the fused kernels.

Each function here has the signature of its fused counterpart in ``mgit_fast.functional`` and
reads like the math in DESIGN.md §1. It is the CPU backend, the oracle the kernel tests compare
against (in float64), and the "eager" peer in the benchmarks. Half-precision inputs are
computed in float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from . import _checks

Scalar = Union[float, Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def patch_sq_dist(grid_size: int, *, device=None, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[P, P]`` squared distances, in patches, between the ``P = grid_size²`` patches of a
    square grid in row-major order."""
    index = torch.arange(grid_size * grid_size, device=device)
    rows, cols = index // grid_size, index % grid_size
    return ((rows[:, None] - rows[None, :]).square() + (cols[:, None] - cols[None, :]).square()).to(dtype)


def gaussian_mixture_bias(weight: Tensor, log_sigma: Tensor, sq_dist: Tensor) -> Tensor:
    """``[H, 1 + P, 1 + P]``: ``Σ_k weight[h, k] · exp(−sq_dist / (2·exp(log_sigma[h, k])²))``
    between the ``P`` patch tokens (``sq_dist`` ``[P, P]``), 0 in token 0's row and column."""
    inv_two_var = rearrange(0.5 * torch.exp(-2.0 * log_sigma), "h k -> h k 1 1")
    kernels = torch.exp(-sq_dist * inv_two_var)
    return F.pad(torch.einsum("hk,hkij->hij", weight, kernels), (1, 0, 1, 0))


class GaussianMixture(NamedTuple):
    """A Gaussian-mixture attention bias given by its parameters, accepted as ``bias=`` by the
    attention functions: ``weight`` and ``log_sigma`` ``[H, K]``, ``grid_size`` patches per side,
    for ``N = 1 + grid_size²`` tokens (a class token, then the patches in row-major order);
    ``bias[h, i, j] = Σ_k weight[h, k] · exp(−‖pos_i − pos_j‖² / (2σ[h, k]²))``,
    ``σ = exp(log_sigma)``, 0 in token 0's row and column (``dense()``, built in PyTorch on
    either path, its gradient reaching ``weight`` and ``log_sigma`` through autograd).
    ``sq_dist``: the grid's ``patch_sq_dist``, if the caller keeps one (``dense()`` builds it
    otherwise)."""

    weight: Tensor
    log_sigma: Tensor
    grid_size: int
    sq_dist: Optional[Tensor] = None

    def dense(self) -> Tensor:
        """The ``[H, N, N]`` bias (differentiable)."""
        sq_dist = self.sq_dist
        if sq_dist is None:
            sq_dist = patch_sq_dist(self.grid_size, device=self.weight.device, dtype=self.weight.dtype)
        return gaussian_mixture_bias(self.weight, self.log_sigma, sq_dist)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Union[None, float, Tensor] = None,
    bias: Union[None, Tensor, GaussianMixture] = None,
    diagonal_mask: bool = False,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """``(softmax(q·kᵀ·scale + bias) ⊙ mask) · v`` for q, k, v ``[B, H, N, D]``; returns
    ``[B, H, N, D]``.

    ``scale``: None (``D**-0.5``), a float, or a tensor of shape ``[]`` or ``[H]``.
    ``bias``: ``[H, N, N]`` or ``[B, H, N, N]`` (size 1 broadcasts), added after scaling, or a
    ``GaussianMixture``.
    ``diagonal_mask``: a token does not attend to itself (LSA).
    ``mask``: a multiplicative mask (IBiT) of the same shapes as ``bias``, applied to the
    attention probabilities with no renormalisation.
    """
    _checks.attention_inputs(q, k, v, scale, bias, diagonal_mask, mask)
    if isinstance(bias, GaussianMixture):
        bias = bias.dense()
    dtype = _compute_dtype(q.dtype)
    N, D = q.shape[-2], q.shape[-1]
    if scale is None:
        scale = D**-0.5
    if isinstance(scale, Tensor):
        scale = rearrange(scale.to(dtype).reshape(-1), "h -> 1 h 1 1")

    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(dtype), k.to(dtype)) * scale
    if bias is not None:
        scores = scores + bias.to(dtype)
    if diagonal_mask:
        eye = torch.eye(N, dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(eye, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs * mask.to(dtype)
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v.to(dtype))
    return out.to(q.dtype)


def attention_qkvpacked(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Union[None, float, Tensor] = None,
    bias: Union[None, Tensor, GaussianMixture] = None,
    diagonal_mask: bool = False,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention straight from a qkv Linear: ``qkv [B, N, 3·H·D]`` (timm's layout,
    ``reshape(B, N, 3, H, D)``) to ``[B, N, H·D]``, ready for the output projection."""
    head_dim = _checks.qkvpacked_inputs(qkv, num_heads)
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=num_heads, d=head_dim)
    out = attention(q, k, v, scale=scale, bias=bias, diagonal_mask=diagonal_mask, mask=mask)
    return rearrange(out, "b h n d -> b n (h d)")


# --------------------------------------------------------------------------------------------
# MGiT loss
# --------------------------------------------------------------------------------------------
class MGiTLossOutput(NamedTuple):
    """The four 0-dim outputs of the MGiT loss; ``loss = ce_primary + ce_auxiliary + λ·js``."""

    loss: Tensor
    ce_primary: Tensor
    ce_auxiliary: Tensor
    js: Tensor


def _masked_mean(per_row: Tensor, keep: Tensor) -> Tensor:
    """Mean over the kept rows; 0 (not NaN, with zero gradient) when no row is kept."""
    count = keep.sum().clamp(min=1).to(per_row.dtype)
    return torch.where(keep, per_row, torch.zeros_like(per_row)).sum() / count


def cross_entropy(
    logits: Tensor, target: Tensor, *, label_smoothing: float = 0.0, ignore_index: int = -100
) -> Tensor:
    """``F.cross_entropy(logits, target, label_smoothing=ε, ignore_index=...)`` (mean), except
    that a batch whose every row is ignored gives 0 instead of NaN."""
    logp = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
    keep = target != ignore_index
    picked = torch.where(keep, target, torch.zeros_like(target)).long()
    nll = -logp.gather(1, picked[:, None]).squeeze(1)
    uniform = -logp.mean(dim=-1)
    per_row = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return _masked_mean(per_row, keep)


def jensen_shannon_rows(logits_p: Tensor, logits_q: Tensor, *, temperature: Scalar = 1.0) -> Tensor:
    """Per-row ``JSD(p‖q)`` in nats, ``p = softmax(logits_p/T)``, ``q = softmax(logits_q/T)``."""
    dtype = _compute_dtype(logits_p.dtype)
    logp = torch.log_softmax(logits_p.to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(logits_q.to(dtype) / temperature, dim=-1)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)  # log(½(p + q))
    kl_pm = (logp.exp() * (logp - logm)).sum(dim=-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(dim=-1)
    return 0.5 * kl_pm + 0.5 * kl_qm


def mgit_loss(
    logits_primary: Tensor,
    logits_auxiliary: Tensor,
    target: Tensor,
    *,
    label_smoothing: float = 0.0,
    temperature: Scalar = 1.0,
    js_weight: Scalar = 0.1,
    ignore_index: int = -100,
) -> MGiTLossOutput:
    """Both cross-entropies, the JS divergence between the tempered predictions, and
    ``loss = ce_primary + ce_auxiliary + js_weight · js``. Rows whose target is
    ``ignore_index`` are left out of every mean. Labels outside ``[0, C)`` raise.
    ``temperature`` and ``js_weight``: floats or 0-dim float32 tensors (used as constants)."""
    _checks.loss_inputs(
        logits_primary,
        logits_auxiliary,
        target,
        label_smoothing=label_smoothing,
        temperature=temperature,
        js_weight=js_weight,
    )
    _checks.labels_in_range(target, logits_primary.shape[1], ignore_index)
    ce_primary = cross_entropy(
        logits_primary, target, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    ce_auxiliary = cross_entropy(
        logits_auxiliary, target, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    js_rows = jensen_shannon_rows(logits_primary, logits_auxiliary, temperature=temperature)
    js = _masked_mean(js_rows, target != ignore_index)
    loss = ce_primary + ce_auxiliary + js_weight * js
    return MGiTLossOutput(loss, ce_primary, ce_auxiliary, js)


# --------------------------------------------------------------------------------------------
# multi-gradient AdamW
# --------------------------------------------------------------------------------------------
class MultiGradientStepOutput(NamedTuple):
    """Device tensors describing one update: the mixing weight μ used, each model's global
    gradient L2 norm before clipping, and whether the step was skipped."""

    mix: Tensor
    norm_primary: Tensor
    norm_auxiliary: Tensor
    skipped: Tensor


def global_grad_norm(grads: Sequence[Optional[Tensor]], device: torch.device) -> Tensor:
    """L2 norm over every gradient, computed as ``torch.nn.utils.clip_grad_norm_`` does."""
    norms = [torch.linalg.vector_norm(g) for g in grads if g is not None]
    if not norms:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))


def _all_finite(grads: Sequence[Optional[Tensor]], device: torch.device) -> Tensor:
    flags = [torch.isfinite(g).all() for g in grads if g is not None]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


def mixing_weight(
    mix: Union[str, float, Tensor],
    *,
    mix_max: float = 0.5,
    ce_primary: Optional[Tensor] = None,
    ce_auxiliary: Optional[Tensor] = None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """μ as a 0-dim device tensor: fixed, or ``mix_max·ce_P/(ce_P + ce_A)`` when
    ``mix="adaptive"`` (0 when both losses are 0)."""
    if isinstance(mix, str):
        if mix != "adaptive":
            raise ValueError(f"mix must be 'adaptive' or a number, got {mix!r}")
        if ce_primary is None or ce_auxiliary is None:
            raise ValueError("mix='adaptive' needs ce_primary and ce_auxiliary")
        ce_p = ce_primary.detach().to(device=device, dtype=dtype)
        ce_a = ce_auxiliary.detach().to(device=device, dtype=dtype)
        total = ce_p + ce_a  # a non-finite loss gives a non-finite μ, which skips the step
        safe = torch.where(total == 0, torch.ones_like(total), total)
        return torch.where(total == 0, torch.zeros_like(total), mix_max * ce_p / safe)
    if isinstance(mix, Tensor):
        return mix.detach().to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(mix), dtype=dtype, device=device)


def _per_model(value, index: int):
    return value[index] if isinstance(value, (tuple, list)) else value


def multi_gradient_adamw(
    params_primary: Sequence[Tensor],
    grads_primary: Sequence[Optional[Tensor]],
    exp_avgs_primary: Sequence[Tensor],
    exp_avg_sqs_primary: Sequence[Tensor],
    params_auxiliary: Sequence[Tensor],
    grads_auxiliary: Sequence[Optional[Tensor]],
    exp_avgs_auxiliary: Sequence[Tensor],
    exp_avg_sqs_auxiliary: Sequence[Tensor],
    *,
    pairs: Sequence[Tuple[int, int]],
    decay_primary: Sequence[bool],
    decay_auxiliary: Sequence[bool],
    step: Tensor,
    skipped_steps: Tensor,
    lr: Union[Scalar, Tuple[Scalar, Scalar]],
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Union[float, Tuple[float, float]] = 0.05,
    mix: Union[str, float, Tensor] = "adaptive",
    mix_max: float = 0.5,
    ce_primary: Optional[Tensor] = None,
    ce_auxiliary: Optional[Tensor] = None,
    average: float = 0.0,
    max_grad_norm: Optional[float] = None,
    grad_scale: Optional[Tensor] = None,
) -> MultiGradientStepOutput:
    """One MGiT update of both models, in place (DESIGN §1 step 4).

    ``pairs`` lists ``(i, j)``: primary parameter ``i`` is paired with auxiliary parameter ``j``.
    ``decay_*[i]`` says whether parameter ``i`` gets weight decay. ``step`` and
    ``skipped_steps`` are 0-dim integer device tensors, advanced in place. ``lr`` is a float,
    a 0-dim tensor, or a ``(primary, auxiliary)`` pair of those; ``weight_decay`` a float or
    such a pair.

    Per model, gradients are clipped by that model's global L2 norm (``max_grad_norm``);
    a paired primary parameter then uses ``(1 − μ)·g_P + μ·g_A``; both models take an AdamW
    step exactly as ``torch.optim.AdamW(amsgrad=False)``; paired primary weights are then
    averaged, ``(1 − γ)·θ_P + γ·θ_A`` (``average=γ``). If any gradient of either model (or μ)
    is non-finite, nothing changes but ``skipped_steps``. Parameters whose gradient is None are
    left alone, as torch's optimizers do, and count as unmixed. ``grad_scale`` (a 0-dim device
    tensor S, for fp16 loss scaling) says the gradients are S times the true ones.
    """
    beta1, beta2 = betas
    device = step.device
    if grad_scale is not None:
        inv_scale = 1.0 / grad_scale.float()
        grads_primary, grads_auxiliary = (
            [None if g is None else g * inv_scale.to(g.dtype) for g in grads]
            for grads in (grads_primary, grads_auxiliary)
        )
    groups = (
        (params_primary, grads_primary, exp_avgs_primary, exp_avg_sqs_primary, decay_primary),
        (params_auxiliary, grads_auxiliary, exp_avgs_auxiliary, exp_avg_sqs_auxiliary, decay_auxiliary),
    )

    # 1. norms, the skip flag and μ
    norms = [global_grad_norm(grads, device) for _, grads, *_ in groups]
    mu = mixing_weight(
        mix,
        mix_max=mix_max,
        ce_primary=ce_primary,
        ce_auxiliary=ce_auxiliary,
        device=device,
        dtype=_compute_dtype(params_primary[0].dtype),
    )
    finite = _all_finite(list(grads_primary) + list(grads_auxiliary), device) & torch.isfinite(mu)
    skip = ~finite

    # 2. clipping, per model
    clipped = []
    for norm, (_, grads, *_) in zip(norms, groups):
        if max_grad_norm is None:
            clipped.append(list(grads))
        else:
            coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            clipped.append([None if g is None else g * coef.to(g.dtype) for g in grads])

    # 3. mixing: paired primary gradients take in the auxiliary's
    effective = [list(clipped[0]), clipped[1]]
    for i, j in pairs:
        g_p, g_a = clipped[0][i], clipped[1][j]
        if g_p is not None and g_a is not None:
            m = mu.to(g_p.dtype)
            effective[0][i] = (1 - m) * g_p + m * g_a

    # 4. AdamW on both models
    t = (step + 1).to(torch.float64)
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    for index, (params, _, exp_avgs, exp_avg_sqs, decay) in enumerate(groups):
        model_lr, model_wd = _per_model(lr, index), _per_model(weight_decay, index)
        for p, g, m, v, decays in zip(params, effective[index], exp_avgs, exp_avg_sqs, decay):
            if g is None:
                continue
            new_p = p * (1 - model_lr * model_wd) if decays else p
            new_m = beta1 * m + (1 - beta1) * g
            new_v = beta2 * v + (1 - beta2) * g * g
            m_hat = new_m / bias_correction1.to(p.dtype)
            v_hat = new_v / bias_correction2.to(p.dtype)
            new_p = new_p - model_lr * m_hat / (v_hat.sqrt() + eps)
            p.copy_(torch.where(skip, p, new_p))
            m.copy_(torch.where(skip, m, new_m))
            v.copy_(torch.where(skip, v, new_v))

    # 5. weighted averaging of paired weights
    if average != 0.0:
        for i, j in pairs:
            p, a = params_primary[i], params_auxiliary[j]
            p.copy_(torch.where(skip, p, (1 - average) * p + average * a))

    step.add_(finite.to(step.dtype))
    skipped_steps.add_(skip.to(skipped_steps.dtype))
    return MultiGradientStepOutput(mu, norms[0], norms[1], skip)
