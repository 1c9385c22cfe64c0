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
    torch.library.opcheck(loss_kernel.mgit_loss_fwd, (z, w, y, 0.1, 2.0, 0.3, -100, True))
    torch.library.opcheck(loss_kernel.mgit_loss_fwd,
                          (z, w, y, 0.1, 1.0, 0.0, -100, True, torch.tensor(2.0), torch.tensor(0.3)))
    torch.library.opcheck(loss_kernel.mgit_loss_fwd, (z.detach(), w.detach(), y, 0.1, 2.0, 0.3, -100, False))


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
