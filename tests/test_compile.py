"""torch.compile sees the kernels as custom ops: their registrations hold up (opcheck), and a
ViT with FusedAttention plus MGiTLoss compiles with fullgraph=True (no graph break) and gives the
eager values and gradients. On the CPU the kernels run in Triton's interpreter."""
import pytest
import torch

from conftest import assert_rel_close
from mgit_fast import FusedAttention, MGiTLoss, ViT
from mgit_fast.kernels import attention as attention_kernel
from mgit_fast.kernels import mgit_loss as loss_kernel


def test_attention_op_registrations():
    """The op torch.compile sees: separate q, k, v (num_heads 0) or a packed qkv (k, v None)."""
    B, H, N, D = 1, 2, 5, 16
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    scale = torch.full((H,), D**-0.5, requires_grad=True)
    bias = torch.randn(H, N, N, requires_grad=True)
    torch.library.opcheck(attention_kernel.attention_fwd, (q, k, v, 0, scale, 1.0, bias, None, True))
    mask = torch.rand(B, H, N, N, requires_grad=True)
    torch.library.opcheck(attention_kernel.attention_fwd, (q, k, v, 0, scale, 1.0, bias, mask, True))
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    torch.library.opcheck(attention_kernel.attention_fwd, (qkv, None, None, H, None, D**-0.5, None, None, False))
    torch.library.opcheck(attention_kernel.attention_fwd,
                          (qkv, None, None, H, None, D**-0.5, None, torch.rand(H, N, N, requires_grad=True), False))


def test_loss_op_registrations():
    z, w = (torch.randn(6, 7, requires_grad=True) for _ in range(2))
    y = torch.tensor([0, 3, -100, 6, 2, 1])
    torch.library.opcheck(loss_kernel.mgit_loss_fwd, (z, w, y, 0.1, 2.0, 0.3, -100, True, None, None))
    torch.library.opcheck(loss_kernel.mgit_loss_fwd,
                          (z, w, y, 0.1, 1.0, 0.0, -100, True, torch.tensor(2.0), torch.tensor(0.3)))
    torch.library.opcheck(loss_kernel.mgit_loss_fwd,
                          (z.detach(), w.detach(), y, 0.1, 2.0, 0.3, -100, False, None, None))


def test_custom_op_schemas_have_no_defaults():
    """A compiled graph leaves a defaulted argument out, so Inductor's on-disk cache key does not
    change when the default or the arguments after it do, and a warm cache then serves code that
    calls the op with an older signature (seen: attention_fwd after its GMM arguments went)."""
    import mgit_fast.kernels  # noqa: F401  (registers the ops)

    ops = [getattr(torch.ops.mgit_fast, name) for name in ("attention_fwd", "attention_bwd", "mgit_loss_fwd",
                                                           "mgit_loss_bwd")]
    for op in ops:
        schema = op.default._schema
        assert not [a.name for a in schema.arguments if a.has_default_value()], schema


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["lsa", "gmm"])
def test_vit_and_loss_compile_without_graph_breaks(attention):
    cfg = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, num_heads=2, attention=attention)
    primary, auxiliary = ViT(depth=2, **cfg), ViT(depth=1, **cfg)
    for m in list(primary.modules()) + list(auxiliary.modules()):
        if isinstance(m, FusedAttention):
            m.backend = "triton"
    criterion = MGiTLoss(label_smoothing=0.1, js_weight=0.5, backend="triton")

    def loss_of(x, y):
        return criterion(primary(x), auxiliary(x), y)

    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    params = list(primary.parameters()) + list(auxiliary.parameters())
    eager = loss_of(x, y)
    eager_grads = torch.autograd.grad(eager.loss, params)
    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(x, y)
    grads = torch.autograd.grad(compiled.loss, params)
    for a, b, name in zip(compiled, eager, ("loss", "ce_primary", "ce_auxiliary", "js")):
        assert_rel_close(a, b, 1e-5, name)
    for g, e in zip(grads, eager_grads):
        assert_rel_close(g, e, 1e-4, "gradient")


# ------------------------------------------------------------------ FusedMGiT(compile=True)
def _mgit(backend, compile, **kwargs):
    from mgit_fast import FusedMGiT

    torch.manual_seed(0)
    primary = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                  attention="lsa")
    return FusedMGiT(primary, aux_seed=1, backend=backend, js_weight=0.3, max_grad_norm=1.0, pairing="all",
                     compile=compile, **kwargs)


def _epochs(sizes=(6, 6, 3), epochs=3):
    """Batches of three epochs, each ending with a short batch."""
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))
            for _ in range(epochs) for n in sizes]


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile"):
        _mgit("torch", "yes")
    with pytest.raises(ValueError, match="overlap"):
        _mgit("torch", True, overlap=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_steps_equal_eager_steps_and_compile_once(backend):
    """Same losses and parameters as compile=False over three epochs; only the first batch's
    shape compiles (the short last batch of each epoch runs eagerly); a schedule on the learning
    rate and λ recompiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager, compiled = _mgit(backend, False), _mgit(backend, True)
    graphs = counters["stats"]["unique_graphs"]
    for step, (x, y) in enumerate(_epochs()):
        for mgit in (eager, compiled):
            mgit.criterion.js_weight = 0.3 / (1 + step)
            for group in mgit.optimizer.param_groups:
                group["lr"] = 1e-3 / (1 + step)
        a, b = eager.training_step(x, y), compiled.training_step(x, y)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"step {step} {key}")
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.compiles == 1 and counters["stats"]["unique_graphs"] - graphs == 1
    assert compiled.compile_seconds > 0 and eager.compile_seconds is None and eager.compiles == 0


@pytest.mark.slow
def test_compiled_step_checks_labels_and_saves_like_the_eager_one(tmp_path):
    import copy
    import pickle

    torch._dynamo.reset()
    mgit = _mgit("torch", True)
    (x, y), _, _ = _epochs(epochs=1)
    mgit.training_step(x, y)
    before = [p.detach().clone() for p in mgit.parameters()]
    with pytest.raises(ValueError, match="outside"):  # outside the graph, before the backward
        mgit.training_step(x, torch.full_like(y, 7))
    for p, q in zip(mgit.parameters(), before):
        assert torch.equal(p, q)
    assert mgit.compiles == 1
    plain = _mgit("torch", False)
    assert mgit.state_dict().keys() == plain.state_dict().keys()
    torch.save(mgit.state_dict(), tmp_path / "mgit.pt")
    plain.load_state_dict(torch.load(tmp_path / "mgit.pt"))
    twin = copy.deepcopy(mgit)
    assert twin._compiled is None and pickle.loads(pickle.dumps(mgit))._compiled is None
    a, b, c = plain.training_step(x, y), mgit.training_step(x, y), twin.training_step(x, y)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(c[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_graph_break_in_a_model_raises():
    """fullgraph=True: a model whose forward breaks the graph fails its first step, loudly."""
    from mgit_fast import FusedMGiT

    class Breaking(ViT):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: a graph break
                x = x * 1.0
            return super().forward(x)

    torch._dynamo.reset()
    cfg = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, num_heads=2)
    mgit = FusedMGiT(Breaking(depth=1, **cfg), ViT(depth=1, **cfg), backend="torch", compile=True)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        mgit.training_step(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
