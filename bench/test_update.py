"""The multi-gradient update of a primary and a one-block auxiliary, against
torch.optim.AdamW(fused=True) on each model plus torch._foreach mixing and clip_grad_norm_ per
model (the best stock PyTorch), and the eager reference.

Bytes that must move: per parameter element, the gradient read, the weight and both moments
read and written (28 bytes in fp32), plus the auxiliary gradient read again for paired ones.
"""
import pytest
import torch
from benchutil import DEVICE, UPDATE_MODELS, run

from mgit_fast import MultiGradientAdamW, ViT

def models(cfg):
    primary = ViT(**cfg).to(DEVICE)
    auxiliary = ViT(**{**cfg, "depth": 1}).to(DEVICE)
    for p in list(primary.parameters()) + list(auxiliary.parameters()):
        p.grad = torch.randn_like(p) * 1e-2
    return primary, auxiliary


def head_pairs(primary, auxiliary):
    """(primary, auxiliary) parameters of the classifier heads, paired by name."""
    theirs = dict(auxiliary.named_parameters())
    pairs = [(p, theirs[n]) for n, p in primary.named_parameters() if n.startswith("head.") and n in theirs]
    if not pairs:
        raise ValueError("the models have no head parameters in common")
    return pairs


def stock_pytorch(primary, auxiliary, mix=0.3, max_grad_norm=1.0):
    """clip per model, mix the heads with _foreach ops, two fused AdamW."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05, fused=True) for m in (primary, auxiliary)]
    heads = head_pairs(primary, auxiliary)

    def step():
        for m in (primary, auxiliary):
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_grad_norm, foreach=True)
        grads_p, grads_a = [p.grad for p, _ in heads], [a.grad for _, a in heads]
        torch._foreach_mul_(grads_p, 1 - mix)
        torch._foreach_add_(grads_p, grads_a, alpha=mix)
        for o in optimizers:
            o.step()

    return step


@pytest.mark.parametrize("name", list(UPDATE_MODELS))
def test_update(benchmark, gpu, name):
    ours_models, peer_models, eager_models = (models(UPDATE_MODELS[name]) for _ in range(3))
    ce = (torch.tensor(2.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))
    ours = MultiGradientAdamW(*ours_models, backend="triton", max_grad_norm=1.0)
    eager = MultiGradientAdamW(*eager_models, backend="torch", max_grad_norm=1.0)
    ours.step(*ce)  # builds the flat layout
    elements = sum(p.numel() for m in ours_models for p in m.parameters())
    run(
        benchmark, gpu, lambda: ours.step(*ce),
        {"stock_pytorch": stock_pytorch(*peer_models), "eager": lambda: eager.step(*ce)},
        flops=20 * elements, nbytes=28 * elements, model=name, parameters=elements,
    )
