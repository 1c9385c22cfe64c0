"""MultiGradientAdamW on the Triton kernel against the torch backend (itself checked against
torch.optim.AdamW in test_optim.py). CPU: Triton's interpreter."""
import copy

import pytest
import torch
from test_optim import Toy, fill_grads, snapshot

from conftest import rel_err
from mgit_fast import FusedMGiT, MultiGradientAdamW, ViT, reference
from mgit_fast.kernels import multi_gradient_adamw as kernel


@pytest.fixture(params=["blocks of 1024", "blocks of 8"])
def block_size(request, monkeypatch):
    """The kernels at their block size, and at 8 elements with at most 3 partial sums per model
    and 2 per reduction chunk: many blocks per sum-of-squares program, several chunks."""
    if request.param == "blocks of 8":
        monkeypatch.setattr(kernel, "BLOCK", 8)
        monkeypatch.setattr(kernel, "MAX_PARTIALS", 3)
        monkeypatch.setattr(kernel, "CHUNK", 2)
    return kernel.BLOCK


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
    """Unpaired extra blocks; afterwards parameters and moments are views of the flat buffers,
    and each .grad is still the tensor it was (read in place, never copied or rebound)."""
    opt, opt_k, models, models_k = twins(depth=3, pairing="all", mix=0.5, average=0.1)
    for _ in range(2):
        fill_grads(*models)
        same_grads(models, models_k)
        grads = [p.grad for m in models_k for p in m.parameters()]
        opt.step(), opt_k.step()
        assert all(p.grad is g for p, g in zip((p for m in models_k for p in m.parameters()), grads))
    assert_close_all(snapshot(*models), snapshot(*models_k))
    flat = opt_k._flat
    for buffer in (flat.params, flat.exp_avgs, flat.exp_avg_sqs):
        base, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * 4
        for t in [p for m in models_k for p in m.parameters()] if buffer is flat.params else \
                [s["exp_avg" if buffer is flat.exp_avgs else "exp_avg_sq"] for s in opt_k.state.values()]:
            assert base <= t.data_ptr() < end
    assert not hasattr(flat, "grads")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["norm.weight", "pos_embed"])  # a tail block; with blocks of 8, a whole one
def test_non_finite_gradient_changes_nothing(bad, where, block_size):
    _, opt_k, _, models_k = twins(pairing="all", average=0.5, max_grad_norm=1.0)
    fill_grads(*models_k)
    opt_k.step(torch.tensor(1.0), torch.tensor(2.0))
    before, moments_before = snapshot(*models_k), [t.clone() for t in moments(opt_k)]
    fill_grads(*models_k)
    models_k[1].get_parameter(where).grad.view(-1)[-2] = bad
    out = opt_k.step(torch.tensor(1.0), torch.tensor(2.0))
    assert bool(out.skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(*models_k)))
    assert all(torch.equal(a, b) for a, b in zip(moments_before, moments(opt_k)))
    assert int(opt_k.step_count) == 1 and int(opt_k.skipped_steps) == 1


SHAPES_PRIMARY = [(7,), (5, 3), (33,), (1,), (4, 4), (17, 2), (3,)]
SHAPES_AUXILIARY = [(5, 3), (9,), (17, 2), (3,)]
PAIRS = [(1, 0), (5, 2), (6, 3)]


@pytest.mark.parametrize("clip, mix, average", [(None, "adaptive", 0.0), (0.7, 0.35, 0.3), (50.0, "adaptive", 0.6)])
def test_layout_matches_the_float64_reference(clip, mix, average, block_size):
    """FlatLayout.step against reference.multi_gradient_adamw in float64: ragged tensors (masked
    last blocks), None gradients (zeros here), fresh gradient tensors each step; the kernels'
    own outputs are poisoned first, and the blocks' padding stays zero."""
    shapes = [torch.Size(s) for s in SHAPES_PRIMARY + SHAPES_AUXILIARY]
    decay = [len(s) >= 2 for s in shapes]
    layout = kernel.FlatLayout(shapes[:7], shapes[7:], PAIRS, decay[:7], decay[7:], torch.device("cpu"))
    state = [[torch.randn(s), torch.randn(s) * 0.1, torch.rand(s) * 0.01] for s in shapes]
    for i, tensors in enumerate(state):
        for buffer, t in zip((layout.params, layout.exp_avgs, layout.exp_avg_sqs), tensors):
            layout.view(buffer, i).copy_(t)
    state = [[t.double() for t in tensors] for tensors in state]
    step, skipped, last_mix = torch.tensor(2), torch.tensor(0), torch.empty(())
    ref_step, ref_skipped = step.clone(), skipped.clone()
    options = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=(0.1, 0.05), mix=mix, mix_max=0.6, average=average,
                   max_grad_norm=clip)
    for round in range(3):
        grads = [torch.randn(s) * 2 for s in shapes]
        grads[3] = None
        if round == 1:
            grads[8] = None  # an auxiliary tensor
        ce = (torch.rand(()) * 3, torch.rand(()) * 3)
        lr = (torch.tensor(1e-2), torch.tensor(3e-2))
        for t in (layout.partial, layout.scalars, last_mix):
            t.fill_(float("nan"))
        out, skip = layout.step(step=step, skipped_steps=skipped, last_mix=last_mix, lr=lr, ce_primary=ce[0],
                                ce_auxiliary=ce[1], grads=grads, **options)
        g64 = [torch.zeros(s, dtype=torch.float64) if g is None else g.double() for g, s in zip(grads, shapes)]
        lists = [[state[i][k] for i in range(len(shapes))] for k in range(3)]
        ref = reference.multi_gradient_adamw(
            lists[0][:7], g64[:7], lists[1][:7], lists[2][:7], lists[0][7:], g64[7:], lists[1][7:], lists[2][7:],
            pairs=PAIRS, decay_primary=decay[:7], decay_auxiliary=decay[7:], step=ref_step, skipped_steps=ref_skipped,
            lr=(1e-2, 3e-2), ce_primary=ce[0].double(), ce_auxiliary=ce[1].double(), **options,
        )
        assert not bool(skip) and not bool(ref.skipped)
        for name, got, want in zip(("mix", "norm_primary", "norm_auxiliary"), out, ref[:3]):
            assert rel_err(got, want) < 1e-6, name
        assert rel_err(last_mix, ref.mix) < 1e-6
        for i in range(len(shapes)):
            for k, buffer in enumerate((layout.params, layout.exp_avgs, layout.exp_avg_sqs)):
                assert rel_err(layout.view(buffer, i), state[i][k]) < 1e-5, (round, i, k)
        assert torch.equal(step, ref_step) and int(skipped) == 0
    padding = torch.ones(layout.total, dtype=torch.bool)
    for i, n in enumerate(layout.numels):
        padding[layout.offsets[i]: layout.offsets[i] + n] = False
    for buffer in (layout.params, layout.exp_avgs, layout.exp_avg_sqs):
        assert torch.count_nonzero(buffer[padding]) == 0


def test_partial_sums_are_bounded(block_size):
    """At most MAX_PARTIALS sum-of-squares programs per model, each over a fixed run of blocks."""
    shapes = [torch.Size((n,)) for n in (5000, 3, 900, 4096, 1)]
    layout = kernel.FlatLayout(shapes[:3], shapes[3:], [], [False] * 3, [False] * 2, torch.device("meta"))
    programs_p, programs_a, per_p, per_a, primary_rows, total_rows = layout.geometry
    assert primary_rows == sum(-(-n // block_size) for n in (5000, 3, 900))
    assert total_rows - primary_rows == sum(-(-n // block_size) for n in (4096, 1))
    for programs, per, rows in ((programs_p, per_p, primary_rows), (programs_a, per_a, total_rows - primary_rows)):
        assert programs <= kernel.MAX_PARTIALS and (programs - 1) * per < rows <= programs * per


@pytest.mark.parametrize("mix", ["adaptive", "fixed"])
def test_hyperparameters_as_device_tensors(mix, block_size):
    """Floats and 0-dim tensors give the same steps; changing a tensor in place changes the next
    step, with nothing rebuilt; state_dict keeps the tensors the optimizer reads."""
    values = dict(mix_max=0.6, average=0.25, max_grad_norm=0.8, mix="adaptive" if mix == "adaptive" else 0.3)
    tensors = {k: v if isinstance(v, str) else torch.tensor(v) for k, v in values.items()}
    runs = []
    for options in (values, tensors, dict(values)):
        primary, auxiliary = pair()
        runs.append((MultiGradientAdamW(primary, auxiliary, backend="triton", lr=1e-2, pairing="all", **options),
                     (primary, auxiliary)))
    (before, models_b), (by_tensor, models_t), (after, models_a) = runs
    for round in range(2):
        fill_grads(*models_b, scale=3.0)  # norms above max_grad_norm: the clip acts
        same_grads(models_b, models_t)
        same_grads(models_b, models_a)
        losses = (torch.rand(()) * 3, torch.rand(()) * 3)
        layout = by_tensor._flat
        outs = [opt.step(*losses) for opt, _ in runs]
        assert round == 0 or by_tensor._flat is layout
        assert_close_all(snapshot(*models_t), snapshot(*models_a), tol=0)
        assert_close_all(outs[1][:3], outs[2][:3], tol=0)
        if round == 0:
            assert_close_all(snapshot(*models_t), snapshot(*models_b), tol=0)
            for key, value in dict(mix_max=0.9, average=0.7, max_grad_norm=0.1, mix=0.8).items():
                if not isinstance(tensors[key], str):
                    tensors[key].fill_(value)  # in place: the optimizer's own tensors
                    setattr(after, key, value)
    changed = [not torch.equal(a, b) for a, b in zip(snapshot(*models_t), snapshot(*models_b))]
    assert all(changed)
    saved = by_tensor.state_dict()
    assert saved["config"]["average"] is not tensors["average"] and torch.equal(saved["config"]["average"], tensors["average"])
    tensors["average"].fill_(0.0)
    by_tensor.load_state_dict(saved)
    assert by_tensor.average is tensors["average"] and torch.equal(tensors["average"], torch.tensor(0.7))


def test_norms_match_clip_grad_norm():
    _, opt_k, _, models_k = twins(pairing="none", mix=0.0, max_grad_norm=1.0)
    fill_grads(*models_k, scale=3.0)
    expected = [torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]) for m in models_k]
    out = opt_k.step()
    torch.testing.assert_close(out.norm_primary, expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.norm_auxiliary, expected[1], rtol=1e-6, atol=0)


def test_zero_grad_sets_none_and_none_counts_as_zero():
    """zero_grad leaves no gradient (a backward then writes fresh ones, accumulating nothing);
    a None .grad counts as zero on this backend: the moments decay, the weight moves by momentum."""
    opt, opt_k, models, models_k = twins(mix=0.4)
    fill_grads(*models)
    same_grads(models, models_k)
    opt.step(), opt_k.step()
    opt_k.zero_grad()
    assert all(p.grad is None for m in models_k for p in m.parameters())
    for p in (p for m in models for p in m.parameters()):
        p.grad = torch.zeros_like(p)
    models_k[0].head.weight.grad = torch.zeros_like(models_k[0].head.weight)  # present and None alike
    opt.step(), opt_k.step()
    assert_close_all(snapshot(*models), snapshot(*models_k))
    assert_close_all(moments(opt), moments(opt_k))
    assert models_k[0].head.bias.grad is None


def test_gradients_replaced_moved_or_converted_between_steps():
    """New .grad tensors each step (as DDP or a user may set them): the address table follows;
    the same tensors again: no upload; unaligned views and strided gradients work."""
    opt, opt_k, models, models_k = twins(mix=0.3, max_grad_norm=2.0, pairing="all")
    params_k = [p for m in models_k for p in m.parameters()]
    for round in range(4):
        fill_grads(*models)
        grads = [p.grad for m in models for p in m.parameters()]
        if round == 1:  # views at an odd element offset of one buffer (no 16-byte alignment)
            bucket = torch.empty(1 + sum(g.numel() for g in grads))
            offset = 1
            for p, g in zip(params_k, grads):
                p.grad = bucket[offset: offset + g.numel()].view_as(g).copy_(g)
                offset += g.numel()
        elif round == 2:  # non-contiguous gradients (dimensions stored in reverse order)
            for p, g in zip(params_k, grads):
                dims = list(range(g.dim()))[::-1]
                p.grad = torch.empty(g.shape[::-1]).permute(dims).copy_(g)
                assert p.grad.is_contiguous() == (g.dim() < 2)
        else:
            same_grads(models, models_k)
        opt.step(), opt_k.step()
        assert_close_all(snapshot(*models), snapshot(*models_k))
        assert opt_k._flat._aligned == (round != 1)
    table = opt_k._flat.grad_table
    key = opt_k._flat._grad_key
    assert table[:, 0].tolist() == [p.grad.data_ptr() for p in params_k]
    assert table[:, 1].tolist() == [p.numel() for p in params_k]
    for p in params_k:
        p.grad.normal_()
    opt_k.step()  # the same tensors: the table is not touched
    assert opt_k._flat._grad_key is key
    models_k[0].head.weight.grad.set_(torch.ones(3))  # torch checks assignments, not this
    with pytest.raises(ValueError, match="head.weight"):
        opt_k.step()


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
                p.grad.copy_(g)  # in place: the addresses the graph captured

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


class _Net(torch.nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.blocks = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(depth)])
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.blocks(x)))


def _ddp_run(rank, world, init_file, out_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        models = (_Net(2), _Net(1))
        replicas = [DistributedDataParallel(m, gradient_as_bucket_view=True) for m in models]
        opt = MultiGradientAdamW(*models, backend="triton", lr=1e-2, mix=0.3, pairing="all", max_grad_norm=1.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            share = slice(rank * 8 // world, (rank + 1) * 8 // world)
            opt.zero_grad()
            sum(torch.nn.functional.cross_entropy(r(x[share]), y[share]) for r in replicas).backward()
            for m in models:  # views into one bucket per model
                assert len({p.grad.untyped_storage().data_ptr() for p in m.parameters()}) == 1
            opt.step()
        assert not opt._flat._aligned  # a 6×6 weight then a 6-element bias: no 16-byte alignment
        if rank == 0:
            torch.save([p.detach() for m in models for p in m.parameters()], out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_bucket_view_gradients_on_two_ranks_equal_one_process(tmp_path):
    """DistributedDataParallel(gradient_as_bucket_view=True): the kernels read the gradients in
    DDP's buckets (unaligned views); two gloo ranks step like one process on the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_run, args=(2, str(tmp_path / "init"), str(tmp_path / "ranks.pt")), nprocs=2, join=True)
    _ddp_run(0, 1, str(tmp_path / "init1"), str(tmp_path / "one.pt"))
    for a, b in zip(torch.load(tmp_path / "ranks.pt"), torch.load(tmp_path / "one.pt")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_graph_of_the_whole_step_with_fresh_gradients_and_tensor_hyperparameters():
    """zero_grad (to None), backward and update captured once: the gradients come from the
    graph's pool, the address table is the graph's own; an in-place change of a hyperparameter
    tensor changes the next replay; eager steps between replays keep their own table."""
    torch.manual_seed(0)
    nets = [_Net(2).cuda(), _Net(1).cuda()]
    ref_nets = copy.deepcopy(nets)
    average = torch.tensor(0.1, device="cuda")
    kwargs = dict(lr=1e-2, mix=0.3, pairing="all", max_grad_norm=1.0)
    opt = MultiGradientAdamW(*nets, backend="triton", average=average, **kwargs)
    ref = MultiGradientAdamW(*ref_nets, backend="torch", average=0.1, **kwargs)

    def step(o, models, x, y):
        o.zero_grad()
        sum(torch.nn.functional.cross_entropy(m(x), y) for m in models).backward()
        o.step()

    batches = [(torch.randn(8, 6, device="cuda"), torch.randint(0, 3, (8,), device="cuda")) for _ in range(5)]
    static_x, static_y = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(opt, nets, static_x, static_y)  # warm-up, eager
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(opt, nets, static_x, static_y)  # recorded, not run
    step(ref, ref_nets, *batches[0])
    for i, (x, y) in enumerate(batches[1:]):
        if i == 2:
            average.fill_(0.6)
            ref.average = 0.6
        if i == 1:
            step(opt, nets, x, y)  # eager, between replays
        else:
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
        step(ref, ref_nets, x, y)
    torch.cuda.synchronize()
    assert int(opt.step_count) == 5
    for a, b in zip(snapshot(*nets), snapshot(*ref_nets)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
