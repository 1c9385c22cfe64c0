"""MultiGradientAdamW (torch backend) against torch.optim.AdamW and a float64 NumPy oracle."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from mgit_fast import MultiGradientAdamW
from mgit_fast.optim import pair_parameters


class Toy(nn.Module):
    """A ViT-shaped toy: a 2-D parameter without decay, 1-D norms, a head."""

    def __init__(self, width=6, classes=3, depth=1):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 4, width))
        self.blocks = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def no_weight_decay(self):
        return {"pos_embed"}


def make_pair(dtype=torch.float64, primary_depth=2):
    torch.manual_seed(0)
    primary = Toy(depth=primary_depth).to(dtype)
    auxiliary = Toy(depth=1).to(dtype)
    for p in list(primary.parameters()) + list(auxiliary.parameters()):
        p.data.normal_()  # LayerNorm weights too, so every parameter moves
    return primary, auxiliary


def fill_grads(*models, scale=1.0):
    for model in models:
        for p in model.parameters():
            p.grad = torch.randn_like(p) * scale


def snapshot(*models):
    return [p.detach().clone() for m in models for p in m.parameters()]


# ---------------------------------------------------------------- a NumPy oracle of DESIGN §1
def oracle_step(prim, aux, state, t, *, pairs, lr, betas, eps, wd, mu, average, max_norm, nwd=("pos_embed",)):
    """prim/aux: {name: (param ndarray, grad ndarray)}; state: {(model, name): (m, v)}."""
    b1, b2 = betas
    grads = {"P": {n: g.copy() for n, (_, g) in prim.items()}, "A": {n: g.copy() for n, (_, g) in aux.items()}}
    if max_norm is not None:
        for key in grads:
            total = math.sqrt(sum(float((g**2).sum()) for g in grads[key].values()))
            coef = min(1.0, max_norm / (total + 1e-6))
            grads[key] = {n: g * coef for n, g in grads[key].items()}
    for n in pairs:
        grads["P"][n] = (1 - mu) * grads["P"][n] + mu * grads["A"][n]
    new = {}
    for key, model in (("P", prim), ("A", aux)):
        for n, (p, _) in model.items():
            g = grads[key][n]
            m, v = state[(key, n)]
            if p.ndim >= 2 and n not in nwd:
                p = p * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            state[(key, n)] = (m, v)
            new[(key, n)] = p
    for n in pairs:
        new[("P", n)] = (1 - average) * new[("P", n)] + average * new[("A", n)]
    return new


def as_numpy(model):
    return {n: (p.detach().numpy().copy(), p.grad.numpy().copy()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("pairing", ["none", "head", "all"])
@pytest.mark.parametrize("mix", ["adaptive", 0.3])
@pytest.mark.parametrize("max_norm", [None, 0.5])
@pytest.mark.parametrize("average", [0.0, 0.25])
def test_matches_numpy_oracle(pairing, mix, max_norm, average):
    primary, auxiliary = make_pair(primary_depth=1)  # same shapes, so "all" pairs everything
    cfg = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = MultiGradientAdamW(
        primary, auxiliary, pairing=pairing, mix=mix, mix_max=0.6, average=average, max_grad_norm=max_norm, **cfg
    )
    names = [n for n, _ in primary.named_parameters()]
    pairs = {"none": [], "head": ["head.weight", "head.bias"], "all": names}[pairing]
    state = {(k, n): (0.0, 0.0) for k in "PA" for n in names}
    for t in range(1, 4):
        fill_grads(primary, auxiliary)
        ce_p, ce_a = torch.rand((), dtype=torch.float64) * 3, torch.rand((), dtype=torch.float64) * 3
        mu = 0.6 * float(ce_p) / float(ce_p + ce_a) if mix == "adaptive" else mix
        expected = oracle_step(
            as_numpy(primary), as_numpy(auxiliary), state, t, pairs=pairs, lr=cfg["lr"], betas=cfg["betas"],
            eps=cfg["eps"], wd=cfg["weight_decay"], mu=mu, average=average, max_norm=max_norm,
        )
        out = opt.step(ce_p, ce_a)
        assert float(out.mix) == pytest.approx(mu, rel=1e-6)
        for key, model in (("P", primary), ("A", auxiliary)):
            for n, p in model.named_parameters():
                np.testing.assert_allclose(p.detach().numpy(), expected[(key, n)], rtol=1e-10, atol=1e-12)
    assert int(opt.step_count) == 3 and int(opt.skipped_steps) == 0


def _torch_adamw_groups(model, lr, wd):
    nwd = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in nwd]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in nwd)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=lr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairing_none_equals_two_torch_adamw(dtype):
    primary, auxiliary = make_pair(dtype)
    ref_p, ref_a = copy.deepcopy(primary), copy.deepcopy(auxiliary)
    opt = MultiGradientAdamW(primary, auxiliary, lr=3e-3, weight_decay=0.05, pairing="none", mix=0.4)
    refs = [_torch_adamw_groups(ref_p, 3e-3, 0.05), _torch_adamw_groups(ref_a, 3e-3, 0.05)]
    for _ in range(5):
        fill_grads(primary, auxiliary)
        for ours, ref in ((primary, ref_p), (auxiliary, ref_a)):
            for p, r in zip(ours.parameters(), ref.parameters()):
                r.grad = p.grad.clone()
        opt.step()
        for ref in refs:
            ref.step()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for p, r in zip(snapshot(primary, auxiliary), snapshot(ref_p, ref_a)):
        torch.testing.assert_close(p, r, rtol=tol, atol=tol)


def test_baseline_without_auxiliary_equals_torch_adamw():
    primary, _ = make_pair()
    ref = copy.deepcopy(primary)
    opt = MultiGradientAdamW(primary, None, lr=1e-2, weight_decay=0.1)
    ref_opt = _torch_adamw_groups(ref, 1e-2, 0.1)
    for _ in range(3):
        fill_grads(primary)
        for p, r in zip(primary.parameters(), ref.parameters()):
            r.grad = p.grad.clone()
        opt.step()  # adaptive mix is moot without an auxiliary
        ref_opt.step()
    for p, r in zip(primary.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-13, atol=1e-13)


def test_clipping_matches_clip_grad_norm_per_model():
    primary, auxiliary = make_pair()
    ref_p, ref_a = copy.deepcopy(primary), copy.deepcopy(auxiliary)
    fill_grads(primary, auxiliary, scale=3.0)
    for ours, ref in ((primary, ref_p), (auxiliary, ref_a)):
        for p, r in zip(ours.parameters(), ref.parameters()):
            r.grad = p.grad.clone()
    opt = MultiGradientAdamW(primary, auxiliary, lr=1e-2, pairing="none", mix=0.0, max_grad_norm=1.0)
    out = opt.step()
    norm_p = torch.nn.utils.clip_grad_norm_(ref_p.parameters(), 1.0)
    norm_a = torch.nn.utils.clip_grad_norm_(ref_a.parameters(), 1.0)
    torch.testing.assert_close(out.norm_primary, norm_p)
    torch.testing.assert_close(out.norm_auxiliary, norm_a)
    assert float(norm_p) > 1.0 and float(norm_a) > 1.0  # the clip really acted
    for ref in (ref_p, ref_a):
        _torch_adamw_groups(ref, 1e-2, 0.05).step()
    for p, r in zip(snapshot(primary, auxiliary), snapshot(ref_p, ref_a)):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["primary", "auxiliary"])
def test_non_finite_gradient_changes_nothing(bad, where):
    primary, auxiliary = make_pair(torch.float32)
    opt = MultiGradientAdamW(primary, auxiliary, pairing="head", average=0.5)
    fill_grads(primary, auxiliary)
    opt.step(torch.tensor(1.0), torch.tensor(2.0))  # non-zero moments first
    before = snapshot(primary, auxiliary)
    moments = [t.clone() for s in opt.state.values() for t in s.values()]
    step_before = opt.step_count.clone()
    fill_grads(primary, auxiliary)
    model = primary if where == "primary" else auxiliary
    model.norm.weight.grad[0] = bad
    out = opt.step(torch.tensor(1.0), torch.tensor(2.0))
    assert bool(out.skipped)
    for a, b in zip(before, snapshot(primary, auxiliary)):
        assert torch.equal(a, b)
    for a, b in zip(moments, [t for s in opt.state.values() for t in s.values()]):
        assert torch.equal(a, b)
    assert torch.equal(opt.step_count, step_before) and int(opt.skipped_steps) == 1
    fill_grads(primary, auxiliary)
    assert not bool(opt.step(torch.tensor(1.0), torch.tensor(2.0)).skipped)
    assert int(opt.step_count) == 2 and int(opt.skipped_steps) == 1


def test_non_finite_loss_skips_adaptive_step():
    primary, auxiliary = make_pair(torch.float32)
    opt = MultiGradientAdamW(primary, auxiliary)
    fill_grads(primary, auxiliary)
    before = snapshot(primary, auxiliary)
    assert bool(opt.step(torch.tensor(float("nan")), torch.tensor(1.0)).skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(primary, auxiliary)))


def test_adaptive_mix_needs_both_losses_and_changes_nothing():
    primary, auxiliary = make_pair()
    opt = MultiGradientAdamW(primary, auxiliary, mix="adaptive")
    fill_grads(primary, auxiliary)
    before = snapshot(primary, auxiliary)
    with pytest.raises(ValueError, match="adaptive"):
        opt.step()
    with pytest.raises(ValueError, match="adaptive"):
        opt.step(torch.tensor(1.0))
    with pytest.raises(ValueError, match="ce_primary"):
        opt.step(torch.ones(3), torch.tensor(1.0))
    with pytest.raises(TypeError, match="ce_auxiliary"):
        opt.step(torch.tensor(1.0), "one")
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(primary, auxiliary)))
    assert int(opt.step_count) == 0 and int(opt.skipped_steps) == 0


def test_adaptive_mix_is_zero_when_both_losses_are_zero():
    primary, auxiliary = make_pair()
    opt = MultiGradientAdamW(primary, auxiliary)
    fill_grads(primary, auxiliary)
    out = opt.step(torch.tensor(0.0), torch.tensor(0.0))
    assert float(out.mix) == 0.0 and not bool(out.skipped)
    assert float(opt.last_mix) == 0.0


def test_state_dict_round_trip_resumes_exactly():
    primary, auxiliary = make_pair(torch.float32)
    kwargs = dict(lr=1e-2, average=0.1, max_grad_norm=2.0)
    opt = MultiGradientAdamW(primary, auxiliary, **kwargs)
    grads = []
    for _ in range(4):
        fill_grads(primary, auxiliary)
        grads.append([p.grad.clone() for m in (primary, auxiliary) for p in m.parameters()])
    losses = [(torch.rand(()), torch.rand(())) for _ in range(4)]

    def run(opt, models, indices):
        for i in indices:
            for p, g in zip([p for m in models for p in m.parameters()], grads[i]):
                p.grad = g.clone()
            opt.step(*losses[i])

    run(opt, (primary, auxiliary), [0, 1])
    saved = copy.deepcopy(opt.state_dict())
    saved_models = copy.deepcopy((primary, auxiliary))
    run(opt, (primary, auxiliary), [2, 3])

    p2, a2 = saved_models
    opt2 = MultiGradientAdamW(p2, a2, **kwargs)
    opt2.load_state_dict(saved)
    run(opt2, (p2, a2), [2, 3])
    for a, b in zip(snapshot(primary, auxiliary), snapshot(p2, a2)):
        assert torch.equal(a, b)
    assert torch.equal(opt.step_count, opt2.step_count)


def test_load_state_dict_rejects_mismatch_without_writing():
    primary, auxiliary = make_pair()
    opt = MultiGradientAdamW(primary, auxiliary)
    fill_grads(primary, auxiliary)
    opt.step(torch.tensor(1.0), torch.tensor(1.0))
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["state"]["auxiliary"]["head.weight"]["exp_avg"] = torch.zeros(7)
    bad["step"] = torch.tensor(99)
    moments = [t.clone() for s in opt.state.values() for t in s.values()]
    with pytest.raises(ValueError, match="head.weight"):
        opt.load_state_dict(bad)
    assert int(opt.step_count) == 1
    assert all(torch.equal(a, b) for a, b in zip(moments, [t for s in opt.state.values() for t in s.values()]))
    other = MultiGradientAdamW(*make_pair(), pairing="none")
    with pytest.raises(ValueError, match="pair"):
        other.load_state_dict(good)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"nope": 1})


def test_lr_scheduler_drives_both_models():
    primary, auxiliary = make_pair()
    opt = MultiGradientAdamW(primary, auxiliary, lr=1e-2, pairing="none", mix=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0: only decay-free no-op
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    fill_grads(primary, auxiliary)
    before = snapshot(primary, auxiliary)
    opt.step()
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(primary, auxiliary)))


def test_lr_may_be_a_device_tensor():
    primary, auxiliary = make_pair()
    ref_p, ref_a = copy.deepcopy(primary), copy.deepcopy(auxiliary)
    lr = torch.tensor(5e-3, dtype=torch.float64)
    opt = MultiGradientAdamW(primary, auxiliary, lr=lr, mix=0.2)
    ref = MultiGradientAdamW(ref_p, ref_a, lr=5e-3, mix=0.2)
    fill_grads(primary, auxiliary)
    for p, r in zip([*primary.parameters(), *auxiliary.parameters()], [*ref_p.parameters(), *ref_a.parameters()]):
        r.grad = p.grad.clone()
    opt.step()
    ref.step()
    for a, b in zip(snapshot(primary, auxiliary), snapshot(ref_p, ref_a)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_parameter_without_grad_is_left_alone():
    primary, auxiliary = make_pair()
    opt = MultiGradientAdamW(primary, auxiliary, mix=0.5)
    fill_grads(primary, auxiliary)
    auxiliary.head.weight.grad = None  # its primary partner is then unmixed
    primary.norm.bias.grad = None
    before_bias = primary.norm.bias.detach().clone()
    ref_head = copy.deepcopy(primary.head)
    ref_opt = torch.optim.AdamW([{"params": [ref_head.weight], "weight_decay": 0.05}], lr=1e-3)
    ref_head.weight.grad = primary.head.weight.grad.clone()
    opt.step()
    ref_opt.step()
    assert torch.equal(primary.norm.bias, before_bias)
    torch.testing.assert_close(primary.head.weight, ref_head.weight, rtol=1e-13, atol=1e-13)


def test_pairing_rules():
    primary, auxiliary = make_pair()
    named_p, named_a = list(primary.named_parameters()), list(auxiliary.named_parameters())
    names_p = [n for n, _ in named_p]
    pairs = pair_parameters(named_p, named_a, "head")
    assert [names_p[i] for i, _ in pairs] == ["head.weight", "head.bias"]
    all_pairs = {names_p[i] for i, _ in pair_parameters(named_p, named_a, "all")}
    # blocks.1.* exist only in the deeper primary
    assert all_pairs == {n for n in names_p if not n.startswith("blocks.1")}
    assert pair_parameters(named_p, named_a, "none") == []
    assert len(pair_parameters(named_p, named_a, ["norm.weight"])) == 1
    with pytest.raises(ValueError, match="blocks.1.weight"):
        pair_parameters(named_p, named_a, ["blocks.1.weight"])
    with pytest.raises(ValueError, match="pairing"):
        pair_parameters(named_p, named_a, "heads")
    with pytest.raises(ValueError, match="pairing"):
        MultiGradientAdamW(primary, Toy(classes=5))  # heads of different shapes: nothing to pair


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(betas=(0.9, 1.0)), ValueError, "betas"),
        (dict(betas=0.9), ValueError, "betas"),
        (dict(eps="x"), TypeError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(mix="sometimes"), ValueError, "mix"),
        (dict(mix=1.5), ValueError, "mix"),
        (dict(mix_max=2.0), ValueError, "mix_max"),
        (dict(average=-0.5), ValueError, "average"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, name):
    primary, auxiliary = make_pair()
    with pytest.raises(error, match=name):
        MultiGradientAdamW(primary, auxiliary, **kwargs)


def test_models_must_be_modules_with_float_parameters():
    primary, auxiliary = make_pair()
    with pytest.raises(TypeError, match="primary"):
        MultiGradientAdamW([p for p in primary.parameters()], auxiliary)
    with pytest.raises(TypeError, match="auxiliary"):
        MultiGradientAdamW(primary, "aux")
    frozen = Toy()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="auxiliary"):
        MultiGradientAdamW(primary, frozen)


@pytest.mark.parametrize("mix", ["adaptive", 0.3])
def test_hyperparameters_may_be_tensors(mix):
    """0-dim tensors for max_grad_norm, mix, mix_max and average step like the floats (torch
    backend), follow in-place changes, and are checked like them."""
    values = dict(mix=mix, mix_max=0.6, average=0.25, max_grad_norm=0.8)
    tensors = {k: v if isinstance(v, str) else torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
    models = [make_pair(), make_pair()]
    opts = [MultiGradientAdamW(*m, lr=1e-2, pairing="all", **o) for m, o in zip(models, (values, tensors))]
    for round in range(2):
        fill_grads(*models[0], scale=3.0)
        for p, q in zip([p for m in models[0] for p in m.parameters()], [p for m in models[1] for p in m.parameters()]):
            q.grad = p.grad.clone()
        losses = (torch.rand((), dtype=torch.float64), torch.rand((), dtype=torch.float64))
        outs = [opt.step(*losses) for opt in opts]
        torch.testing.assert_close(outs[0].mix, outs[1].mix, rtol=1e-12, atol=0)
        for a, b in zip(snapshot(*models[0]), snapshot(*models[1])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for key, value in dict(mix_max=0.9, average=0.7, max_grad_norm=0.1, mix=0.8).items():
            if not isinstance(tensors[key], str):
                tensors[key].fill_(value)
                setattr(opts[0], key, value)
    primary, auxiliary = make_pair()
    with pytest.raises(ValueError, match="average"):
        MultiGradientAdamW(primary, auxiliary, average=torch.tensor([0.1]))
    with pytest.raises(TypeError, match="max_grad_norm"):
        MultiGradientAdamW(primary, auxiliary, max_grad_norm=torch.tensor(1))
