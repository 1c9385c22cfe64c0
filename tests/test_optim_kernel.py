"""MultiGradientAdamW on the Triton kernel against the torch backend (itself checked against
torch.optim.AdamW in test_optim.py). CPU: Triton's interpreter."""
import copy

import pytest
import torch
from test_optim import Toy, fill_grads, snapshot

from mgit_fast import FusedMGiT, MultiGradientAdamW, ViT


def pair(depth=1):
    torch.manual_seed(0)
    primary, auxiliary = Toy(depth=depth), Toy(depth=1)
    for p in list(primary.parameters()) + list(auxiliary.parameters()):
        p.data.normal_()
    return primary, auxiliary


def twins(**kwargs):
    """(torch optimizer, triton optimizer) over identical copies of two models."""
    primary, auxiliary = pair(kwargs.pop("depth", 1))
    models_t = copy.deepcopy((primary, auxiliary))
    return (
        MultiGradientAdamW(primary, auxiliary, backend="torch", **kwargs),
        MultiGradientAdamW(*models_t, backend="triton", **kwargs),
        (primary, auxiliary),
        models_t,
    )


def same_grads(src, dst):
    for a, b in zip([p for m in src for p in m.parameters()], [p for m in dst for p in m.parameters()]):
        b.grad = a.grad.clone()


def moments(opt):
    return [t for s in opt.state.values() for t in s.values()]


def assert_close_all(a, b, tol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("pairing", ["none", "head", "all"])
@pytest.mark.parametrize("mix", ["adaptive", 0.3])
@pytest.mark.parametrize("max_grad_norm, average", [(None, 0.0), (0.5, 0.25)])
def test_triton_equals_torch(pairing, mix, max_grad_norm, average):
    opt, opt_k, models, models_k = twins(
        lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, pairing=pairing, mix=mix, average=average,
        max_grad_norm=max_grad_norm,
    )
    for _ in range(3):
        fill_grads(*models)
        same_grads(models, models_k)
        losses = (torch.rand(()) * 3, torch.rand(()) * 3)
        out, out_k = opt.step(*losses), opt_k.step(*losses)
        assert_close_all(out[:3], out_k[:3])
        assert bool(out.skipped) == bool(out_k.skipped) is False
    assert_close_all(snapshot(*models), snapshot(*models_k))
    assert_close_all(moments(opt), moments(opt_k))
    assert torch.equal(opt.step_count, opt_k.step_count) and float(opt.last_mix) == pytest.approx(float(opt_k.last_mix))


def test_deeper_primary_and_the_views():
    """Unpaired extra blocks; afterwards parameters, grads and moments are views of the flat buffers."""
    opt, opt_k, models, models_k = twins(depth=3, pairing="all", mix=0.5, average=0.1)
    for _ in range(2):
        fill_grads(*models)
        same_grads(models, models_k)
        opt.step(), opt_k.step()
    assert_close_all(snapshot(*models), snapshot(*models_k))
    flat = opt_k._flat
    base = flat.params.data_ptr()
    end = base + flat.params.numel() * 4
    for p in (p for m in models_k for p in m.parameters()):
        assert base <= p.data_ptr() < end
        assert flat.grads.data_ptr() <= p.grad.data_ptr() < flat.grads.data_ptr() + flat.grads.numel() * 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_changes_nothing(bad):
    _, opt_k, _, models_k = twins(pairing="all", average=0.5, max_grad_norm=1.0)
    fill_grads(*models_k)
    opt_k.step(torch.tensor(1.0), torch.tensor(2.0))
    before, moments_before = snapshot(*models_k), [t.clone() for t in moments(opt_k)]
    fill_grads(*models_k)
    models_k[1].norm.weight.grad[1] = bad
    out = opt_k.step(torch.tensor(1.0), torch.tensor(2.0))
    assert bool(out.skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(*models_k)))
    assert all(torch.equal(a, b) for a, b in zip(moments_before, moments(opt_k)))
    assert int(opt_k.step_count) == 1 and int(opt_k.skipped_steps) == 1


def test_norms_match_clip_grad_norm():
    _, opt_k, _, models_k = twins(pairing="none", mix=0.0, max_grad_norm=1.0)
    fill_grads(*models_k, scale=3.0)
    expected = [torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]) for m in models_k]
    out = opt_k.step()
    torch.testing.assert_close(out.norm_primary, expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.norm_auxiliary, expected[1], rtol=1e-6, atol=0)


def test_replaced_and_missing_grads_are_rebound():
    """DDP (or a user) may replace .grad; a None .grad counts as zero on this backend."""
    opt, opt_k, models, models_k = twins(mix=0.4)
    fill_grads(*models)
    same_grads(models, models_k)
    opt.step(), opt_k.step()
    fill_grads(*models)
    same_grads(models, models_k)  # fresh tensors, not the flat views
    opt.step(), opt_k.step()
    assert_close_all(snapshot(*models), snapshot(*models_k))
    opt_k.zero_grad()
    assert all(torch.count_nonzero(p.grad) == 0 for m in models_k for p in m.parameters())
    models_k[0].head.bias.grad = None
    opt_k.step()  # a zero gradient: moments decay, the weight still moves by momentum
    assert models_k[0].head.bias.grad is not None


def test_state_dict_moves_between_backends():
    opt, opt_k, models, models_k = twins(lr=5e-3, average=0.2, max_grad_norm=2.0)
    grads = []
    for _ in range(4):
        fill_grads(*models)
        grads.append([p.grad.clone() for m in models for p in m.parameters()])

    def run(o, ms, indices):
        for i in indices:
            for p, g in zip([p for m in ms for p in m.parameters()], grads[i]):
                p.grad = g.clone()
            o.step(torch.tensor(1.0 + i), torch.tensor(2.0))

    run(opt, models, [0, 1])
    saved, saved_models = copy.deepcopy(opt.state_dict()), copy.deepcopy(models)
    run(opt, models, [2, 3])
    moved = MultiGradientAdamW(*saved_models, backend="triton", lr=5e-3, average=0.2, max_grad_norm=2.0)
    moved.load_state_dict(saved)
    run(moved, saved_models, [2, 3])
    assert_close_all(snapshot(*models), snapshot(*saved_models))
    back = MultiGradientAdamW(*copy.deepcopy(saved_models), backend="torch", lr=5e-3, average=0.2, max_grad_norm=2.0)
    back.load_state_dict(moved.state_dict())
    assert_close_all(moments(back), moments(moved), tol=0)
    assert torch.equal(back.step_count, moved.step_count)


def test_learning_rate_schedule_and_device_tensor():
    opt, opt_k, models, models_k = twins(lr=1e-2, mix=0.2)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s) for o in (opt, opt_k)]
    for _ in range(3):
        fill_grads(*models)
        same_grads(models, models_k)
        opt.step(), opt_k.step()
        for s in schedules:
            s.step()
    assert_close_all(snapshot(*models), snapshot(*models_k))
    lr = torch.tensor(1e-2)
    _, by_tensor, _, models_t = twins(lr=lr, mix=0.2)
    fill_grads(*models_t)
    before = snapshot(*models_t)
    lr.fill_(0.0)  # the kernel reads the tensor at step time
    by_tensor.step()
    decayed = [a for a, b in zip(before, snapshot(*models_t)) if not torch.equal(a, b)]
    assert decayed == []


def test_parameters_must_be_float32():
    primary, auxiliary = pair()
    with pytest.raises(TypeError, match="parameter 'pos_embed'"):
        MultiGradientAdamW(primary.double(), auxiliary.double(), backend="triton")


def test_fused_mgit_triton_steps_like_torch():
    """The whole MGiT step on the three kernels: two steps of a tiny LSA ViT agree with the torch
    backend. (No qkv bias: the key bias has an exactly-zero gradient, whose rounding noise Adam
    would turn into lr-sized steps; the updates are compared, for the same reason.)"""
    torch.manual_seed(0)
    primary = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                  attention="lsa", qkv_bias=False)
    kwargs = dict(aux_seed=1, js_weight=0.5, max_grad_norm=1.0, average=0.1, pairing="all")
    runs = [FusedMGiT(copy.deepcopy(primary), backend=backend, **kwargs) for backend in ("torch", "triton")]
    initial = [p.detach().clone() for p in runs[0].parameters()]
    for _ in range(2):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
        a, b = (run.training_step(x, y) for run in runs)
        for key in a:
            torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-4, atol=1e-6)
    for (name, p), q, p0 in zip(runs[0].named_parameters(), runs[1].parameters(), initial):
        err = ((q - p0) - (p - p0)).norm() / (p - p0).norm()
        assert err < 2e-3, name


# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_vit_s_sized_models_and_graph_replay():
    """ViT-S-sized models; a step captured in a CUDA graph and replayed equals eager steps."""
    primary = ViT(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6).cuda()
    auxiliary = ViT(img_size=32, patch_size=4, embed_dim=384, depth=1, num_heads=6).cuda()
    models = copy.deepcopy((primary, auxiliary))
    lr = torch.tensor(1e-3, device="cuda")
    opt = MultiGradientAdamW(primary, auxiliary, backend="triton", lr=lr, max_grad_norm=1.0)
    ref = MultiGradientAdamW(*models, backend="torch", lr=1e-3, max_grad_norm=1.0)
    ce = (torch.tensor(2.0, device="cuda"), torch.tensor(1.0, device="cuda"))
    grads = [[torch.randn_like(p) for m in models for p in m.parameters()] for _ in range(4)]

    def load(ms, i):
        for p, g in zip([p for m in ms for p in m.parameters()], grads[i]):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)  # in place: the flat views stay bound, as under graph replay

    load((primary, auxiliary), 0)
    opt.step(*ce)  # eager warm-up: builds the flat layout
    load((primary, auxiliary), 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step(*ce)  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(*ce)  # recorded, not run
    for i in (2, 3):
        load((primary, auxiliary), i)
        graph.replay()
    for i in range(4):
        load(models, i)
        ref.step(*ce)
    torch.cuda.synchronize()
    assert int(opt.step_count) == 4
    for a, b in zip(snapshot(primary, auxiliary), snapshot(*models)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
