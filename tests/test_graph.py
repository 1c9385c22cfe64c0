"""FusedMGiT(graph=True) and overlap=True: a captured, replayed step equals the eager step;
a second stream changes nothing but the timing. The CUDA tests run where a GPU is."""
import copy

import pytest
import torch

from mgit_fast import FusedMGiT, ViT
from mgit_fast.train import TrainConfig, train


def build(device="cpu", seed=0, **kwargs):
    torch.manual_seed(seed)
    primary = ViT(img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=64, depth=2, num_heads=2,
                  attention=kwargs.pop("attention", "lsa"))
    defaults = dict(aux_seed=seed + 1, lr=3e-3, js_weight=0.3, pairing="all", max_grad_norm=1.0)
    defaults.update(kwargs)
    return FusedMGiT(primary.to(device), **defaults).to(device)


def batches(device, sizes=(16, 16, 16, 5, 16, 16, 16, 16)):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 3, 16, 16, generator=g).to(device), torch.randint(0, 7, (n,), generator=g).to(device))
            for n in sizes]


def run(mgit, data, every=None):
    scheduler = torch.optim.lr_scheduler.LambdaLR(mgit.optimizer, lambda step: 1.0 / (1 + step))
    stats = []
    for step, (x, y) in enumerate(data):
        if every is not None:
            every(mgit, step)
        stats.append(mgit.training_step(x, y))
        scheduler.step()
    return stats


def assert_same_run(a, b, stats_a, stats_b, rtol, atol):
    for step, (sa, sb) in enumerate(zip(stats_a, stats_b)):
        assert set(sa) == set(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=atol, msg=f"step {step} {key}")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def test_graph_options_are_checked():
    with pytest.raises(TypeError, match="graph"):
        build(graph="yes")
    with pytest.raises(ValueError, match="graph_warmup"):
        build(graph=True, graph_warmup=0)


def test_graph_and_overlap_leave_cpu_steps_eager():
    data = batches("cpu", sizes=(8, 8, 8, 8, 3))
    plain, options = build(), build(graph=True, graph_warmup=1, overlap=True)
    assert_same_run(plain, options, run(plain, data), run(options, data), rtol=0, atol=0)
    assert options._captured is None


# -------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("overlap", [False, True])
def test_cuda_graph_replay_equals_eager_steps(overlap):
    """Warm-up, capture, replays with a scheduled lr, a short batch run eagerly in between."""
    data = batches("cuda")
    eager, graphed = build("cuda"), build("cuda", graph=True, graph_warmup=2, overlap=overlap)
    stats_eager, stats_graph = run(eager, data), run(graphed, data)
    assert graphed._captured is not None and graphed._captured.x.shape[0] == 16
    assert_same_run(eager, graphed, stats_eager, stats_graph, rtol=1e-4, atol=1e-5)
    assert int(graphed.optimizer.step_count) == len(data)


@pytest.mark.cuda
def test_cuda_graph_recaptures_after_a_hyperparameter_change():
    data = batches("cuda")

    def change(mgit, step):
        if step == 5:
            mgit.criterion.js_weight = 2.0
            mgit.optimizer.max_grad_norm = 0.1

    eager, graphed = build("cuda"), build("cuda", graph=True, graph_warmup=1)
    stats_eager, stats_graph = run(eager, data, change), run(graphed, data, change)
    assert_same_run(eager, graphed, stats_eager, stats_graph, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_bad_label_skips_the_step_and_raises():
    data = batches("cuda")[:3]
    mgit = build("cuda", graph=True, graph_warmup=1)
    run(mgit, data)
    assert mgit._captured is not None
    before = [p.detach().clone() for p in mgit.parameters()]
    x, y = data[0]
    bad = y.clone()
    bad[2] = 99
    stats = mgit.training_step(x, bad)
    assert bool(stats["skipped"]) and torch.isnan(stats["loss"])
    with pytest.raises(ValueError, match="outside"):
        mgit.criterion.check_labels()
    for p, q in zip(mgit.parameters(), before):
        assert torch.equal(p, q)
    stats = mgit.training_step(x, y)  # the graph goes on
    assert not bool(stats["skipped"])


@pytest.mark.cuda
def test_cuda_graph_needs_the_triton_backend():
    mgit = build("cuda", graph=True, backend="torch")
    x, y = batches("cuda")[0]
    with pytest.raises(ValueError, match="graph=True"):
        mgit.training_step(x, y)


@pytest.mark.cuda
def test_cuda_graph_resume_and_copy():
    """A captured model's state_dict resumes into a fresh one, and a deep copy (which drops
    the graph) steps like the original."""
    data = batches("cuda")
    a = build("cuda", graph=True, graph_warmup=1)
    run(a, data[:4])
    b = build("cuda", graph=True, graph_warmup=1)
    b.load_state_dict(a.state_dict())
    c = copy.deepcopy(a)
    assert c._captured is None
    for (x, y) in data[4:]:
        sa, sb, sc = a.training_step(x, y), b.training_step(x, y), c.training_step(x, y)
        torch.testing.assert_close(sb["loss"], sa["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sc["loss"], sa["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_bf16_digits_training_reaches_the_cpu_band():
    """The main job's MGiT arm on the GPU (bf16 autocast, Triton kernels, CUDA graph): the CPU
    run gives 94.0 ± 1.4 % over five seeds; seed 0 must land above 92 %."""
    results = train(TrainConfig(seeds=[0], baseline=False, device="cuda", graph=True), show_progress=False)
    assert results["mgit"]["test_accuracy"][0] >= 92.0
