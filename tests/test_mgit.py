"""FusedMGiT: one step equals its pieces, resume is bit-exact, bad input is named and harmless."""
import copy
import io

import pytest
import torch
from conftest import rel_err

from mgit_fast import FusedAttention, FusedMGiT, MGiTLoss, MultiGradientAdamW, ViT, make_auxiliary, reference


def tiny_vit(**kwargs):
    cfg = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kwargs)
    return ViT(**cfg)


def batch(n=12, classes=5):
    return torch.randn(n, 1, 8, 8), torch.randint(0, classes, (n,))


def params(*models):
    return [p.detach().clone() for m in models for p in m.parameters()]


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return FusedMGiT(tiny_vit(attention=kwargs.pop("attention", "standard")), aux_seed=seed + 1, **kwargs)


def test_training_step_outputs():
    mgit = build(js_weight=0.3)
    x, y = batch()
    out = mgit.training_step(x, y)
    assert set(out) == {"loss", "ce_primary", "ce_auxiliary", "js", "mix", "skipped"}
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
    assert out["skipped"].dtype == torch.bool and not bool(out["skipped"])
    torch.testing.assert_close(out["loss"], out["ce_primary"] + out["ce_auxiliary"] + 0.3 * out["js"])
    torch.testing.assert_close(out["mix"], 0.5 * out["ce_primary"] / (out["ce_primary"] + out["ce_auxiliary"]))
    assert int(mgit.optimizer.step_count) == 1
    torch.testing.assert_close(mgit(x), mgit.primary(x))


@pytest.mark.parametrize("attention", ["standard", "lsa", "gmm"])
def test_step_equals_its_pieces(attention):
    """training_step = both forwards, MGiTLoss, one backward, MultiGradientAdamW.step."""
    kwargs = dict(lr=3e-3, label_smoothing=0.1, temperature=2.0, js_weight=0.5, pairing="all", average=0.2, max_grad_norm=1.0)
    mgit = build(attention=attention, **kwargs)
    primary, auxiliary = copy.deepcopy(mgit.primary), copy.deepcopy(mgit.auxiliary)
    loss_fn = MGiTLoss(label_smoothing=0.1, temperature=2.0, js_weight=0.5)
    opt = MultiGradientAdamW(primary, auxiliary, lr=3e-3, pairing="all", average=0.2, max_grad_norm=1.0)
    for _ in range(2):
        x, y = batch()
        mgit.training_step(x, y)
        opt.zero_grad()
        out = loss_fn(primary(x), auxiliary(x), y)
        out.loss.backward()
        opt.step(out.ce_primary, out.ce_auxiliary)
    for a, b in zip(params(mgit.primary, mgit.auxiliary), params(primary, auxiliary)):
        assert torch.equal(a, b)


def test_resume_is_bit_exact(tmp_path):
    batches = [batch() for _ in range(5)]
    kwargs = dict(lr=5e-3, average=0.1, max_grad_norm=2.0, attention="lsa")
    straight = build(**kwargs)
    for x, y in batches:
        straight.training_step(x, y)

    first = build(**kwargs)
    for x, y in batches[:2]:
        first.training_step(x, y)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(seed=123, **kwargs)  # different initial weights, overwritten by the load
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for x, y in batches[2:]:
        resumed.training_step(x, y)

    for a, b in zip(params(straight.primary, straight.auxiliary), params(resumed.primary, resumed.auxiliary)):
        assert torch.equal(a, b)
    for name in ("step_count", "skipped_steps", "last_mix"):
        assert torch.equal(getattr(straight.optimizer, name), getattr(resumed.optimizer, name))
    assert int(resumed.optimizer.step_count) == 5


def test_bad_inputs_are_named_and_change_nothing():
    mgit = build()
    x, y = batch()
    before = params(mgit.primary, mgit.auxiliary)
    with pytest.raises(TypeError, match="x"):
        mgit.training_step(x.numpy(), y)
    with pytest.raises(TypeError, match="y"):
        mgit.training_step(x, y.float())
    with pytest.raises(ValueError, match="y"):
        mgit.training_step(x, y[:-1])
    bad = y.clone()
    bad[3] = 7  # 5 classes
    with pytest.raises(ValueError, match="target"):
        mgit.training_step(x, bad)
    with pytest.raises(ValueError, match="x"):
        mgit.training_step(torch.randn(12, 1, 9, 9), y)
    for a, b in zip(before, params(mgit.primary, mgit.auxiliary)):
        assert torch.equal(a, b)
    assert int(mgit.optimizer.step_count) == 0
    assert all(torch.count_nonzero(t) == 0 for s in mgit.optimizer.state.values() for t in s.values())


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(amp_dtype="bf16"), TypeError, "amp_dtype"),
        (dict(aux_depth=3), ValueError, "depth"),
        (dict(js_weight="x"), TypeError, "js_weight"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(mix=2.0), ValueError, "mix"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        FusedMGiT(tiny_vit(), **kwargs)


def test_backend_reaches_every_attention_and_the_loss():
    mgit = build(backend="torch")
    attentions = [m for m in mgit.modules() if isinstance(m, FusedAttention)]
    assert len(attentions) == 3  # two primary blocks, one auxiliary block
    assert all(m.backend == "torch" for m in attentions)
    assert mgit.criterion.backend == "torch" and mgit.optimizer.backend == "torch"


def test_bfloat16_autocast_on_cpu_trains():
    mgit = build(amp_dtype=torch.bfloat16)
    x, y = batch()
    out = mgit.training_step(x, y)
    assert all(torch.isfinite(v.float()) for v in out.values())
    assert all(p.dtype == torch.float32 for p in mgit.parameters())
    assert int(mgit.optimizer.step_count) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_loss_scaling(backend):
    """fp16 autocast: the backward sees loss·S, the update sees the true gradients; an
    overflow skips the step (nothing changes), halves S, and training goes on; S doubles
    after growth_interval clean steps; S travels in the state_dict."""
    mgit = build(amp_dtype=torch.float16, backend=backend)
    scaler = mgit.loss_scale
    assert float(scaler.scale) == 2.0**16
    scaler.growth_interval = 2
    reference = build(amp_dtype=torch.float16, backend=backend)
    reference.loss_scale.scale.fill_(1.0)  # the same step without scaling (S = 1: exact)
    x, y = batch()
    mgit.training_step(x, y)
    reference.training_step(x, y)
    # Adam's step hides a gradient's scale (and flips on fp16-rounded near-zero gradients),
    # so compare the moments: m = (1 − β1)·g once unscaled
    moments = [[s["exp_avg"] for s in m.optimizer.state.values()] for m in (mgit, reference)]
    errors = [rel_err(a, b) for a, b in zip(*moments)]
    assert max(errors) < 0.05, errors  # fp16 rounding at S = 1; a scale left in would be ×65536

    before = params(mgit)
    scaler.scale.fill_(2.0**127)  # the scaled loss overflows
    out = mgit.training_step(x, y)
    assert bool(out["skipped"]) and int(mgit.optimizer.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params(mgit)))
    assert float(scaler.scale) == 2.0**126 and int(mgit.optimizer.step_count) == 1

    scaler.scale.fill_(1024.0)
    for _ in range(2):  # two clean steps, then growth
        out = mgit.training_step(x, y)
        assert not bool(out["skipped"])
    assert float(scaler.scale) == 2048.0 and int(mgit.optimizer.step_count) == 3

    resumed = build(amp_dtype=torch.float16, backend=backend)
    resumed.load_state_dict(mgit.state_dict())
    assert float(resumed.loss_scale.scale) == 2048.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_scale_divides_the_gradients(backend):
    """MultiGradientAdamW.step(grad_scale=S) on S·g equals step() on g (S a power of two)."""
    torch.manual_seed(0)
    models = [tiny_vit() for _ in range(2)]
    copies = [copy.deepcopy(m) for m in models]
    opts = [MultiGradientAdamW(*pair, pairing="all", max_grad_norm=0.5, backend=backend) for pair in (models, copies)]
    x, y = batch()
    for pair, scale in ((models, 1.0), (copies, 512.0)):
        for m in pair:
            (torch.nn.functional.cross_entropy(m(x), y) * scale).backward()
    scale = torch.tensor(512.0)
    ce = (torch.tensor(1.0), torch.tensor(2.0))
    plain, scaled = opts[0].step(*ce), opts[1].step(*ce, grad_scale=scale)
    torch.testing.assert_close(scaled.norm_primary, plain.norm_primary)
    torch.testing.assert_close(scaled.norm_auxiliary, plain.norm_auxiliary)
    for a, b in zip(opts[0].state.values(), opts[1].state.values()):
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], rtol=1e-6, atol=1e-9)
    for a, b in zip(params(*models), params(*copies)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="grad_scale"):
        opts[1].step(*ce, grad_scale=torch.ones(2))


def test_to_moves_optimizer_state_with_the_parameters():
    mgit = build().to(torch.float64)
    x, y = batch()
    mgit.training_step(x.double(), y)
    assert all(t.dtype == torch.float64 for s in mgit.optimizer.state.values() for t in s.values())
    assert mgit.optimizer.step_count.dtype == torch.int64 and int(mgit.optimizer.step_count) == 1


def test_given_auxiliary_is_used():
    primary = tiny_vit()
    auxiliary = make_auxiliary(primary, 1, seed=5)
    mgit = FusedMGiT(primary, auxiliary)
    assert mgit.auxiliary is auxiliary and len(auxiliary.blocks) == 1
    # the reference loss really sees the auxiliary's logits
    x, y = batch()
    out = mgit.training_step(x, y)
    assert float(out["js"]) > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deep_copy_and_whole_module_save_step_like_the_original(backend):
    """The copy owns its own tensors (optimizer state included) and continues identically, also
    when an LR scheduler has wrapped the optimizer's ``step`` (the copy must not step the
    original's models, and the wrapper must not stop ``torch.save``)."""
    mgit = build(backend=backend, pairing="all")
    scheduler = torch.optim.lr_scheduler.LambdaLR(mgit.optimizer, lambda step: 1.0 / (1 + step))
    x, y = batch()
    mgit.training_step(x, y)
    scheduler.step()
    saved = io.BytesIO()
    torch.save(mgit, saved)
    saved.seek(0)
    copies = [copy.deepcopy(mgit), torch.load(saved, weights_only=False)]
    for other in copies:
        assert int(other.optimizer.step_count) == 1
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(mgit.parameters(), other.parameters()))
    for _ in range(2):
        x, y = batch()
        losses = [m.training_step(x, y)["loss"] for m in [mgit] + copies]
        assert all(torch.equal(loss, losses[0]) for loss in losses)
    for other in copies:
        for p, q in zip(mgit.parameters(), other.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_batch_is_refused_and_changes_nothing(backend):
    mgit = build(backend=backend)
    mgit.training_step(*batch())
    before, steps = params(mgit.primary, mgit.auxiliary), int(mgit.optimizer.step_count)
    moments = [s["exp_avg"].clone() for s in mgit.optimizer.state.values()]
    x, y = batch(0)
    with pytest.raises(ValueError, match="x holds no images"):
        mgit.training_step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(params(mgit.primary, mgit.auxiliary), before))
    assert int(mgit.optimizer.step_count) == steps
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(mgit.optimizer.state.values(), moments))
