"""The MGiT loss, forward+backward, against the eager reference, torch.compile of it, and
Liger-Kernel's JSD plus two cross-entropies (when liger-kernel is installed). bf16 logits.

Bytes that must move: both logits read in the forward and once more in the backward, both
gradients written once: 6·B·C·2 bytes (a chunked row, C > 2048, reads its logits once more).
"""
import pytest
import torch
import torch.nn.functional as F
from benchutil import DEVICE, LOSS_BATCHES, LOSS_CLASSES, compiled, run

from mgit_fast import functional, reference

OPTIONS = dict(label_smoothing=0.1, temperature=1.0, js_weight=0.1)


def reference_math(z, w, y):
    """The reference's math without its host-side label check (which would synchronise and
    break a compiled graph): the peers time the arithmetic only. No row is ignored here."""
    ce_z = reference.cross_entropy(z, y, label_smoothing=OPTIONS["label_smoothing"])
    ce_w = reference.cross_entropy(w, y, label_smoothing=OPTIONS["label_smoothing"])
    js = reference.jensen_shannon_rows(z, w, temperature=OPTIONS["temperature"]).mean()
    return ce_z + ce_w + OPTIONS["js_weight"] * js


def liger_peer(z, w, y):
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError:
        return None
    jsd = LigerJSD(beta=0.5)

    def loss():
        ce_z = F.cross_entropy(z, y, label_smoothing=OPTIONS["label_smoothing"])
        ce_w = F.cross_entropy(w, y, label_smoothing=OPTIONS["label_smoothing"])
        js = jsd(torch.log_softmax(w.float(), -1), torch.log_softmax(z.float(), -1))
        return ce_z + ce_w + OPTIONS["js_weight"] * js

    return loss


@pytest.mark.parametrize("C", LOSS_CLASSES)
@pytest.mark.parametrize("B", LOSS_BATCHES)
def test_loss(benchmark, gpu, B, C):
    z = torch.randn(B, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(B, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, C, (B,), device=DEVICE)
    compiled_math = compiled(reference_math)

    def fwd_bwd(fn):
        def call():
            out = fn()
            loss = out.loss if hasattr(out, "loss") else out
            torch.autograd.grad(loss, [z, w])
        return call

    liger = liger_peer(z, w, y)
    peers = {
        "eager": fwd_bwd(lambda: reference_math(z, w, y)),
        "compiled": fwd_bwd(lambda: compiled_math(z, w, y)),
        "liger": fwd_bwd(liger) if liger is not None else None,
    }
    passes = 6 if C <= 2048 else 8
    run(
        benchmark, gpu, fwd_bwd(lambda: functional.mgit_loss(z, w, y, **OPTIONS, backend="triton")), peers,
        flops=30 * B * C, nbytes=passes * B * C * 2, batch=B, classes=C,
    )
