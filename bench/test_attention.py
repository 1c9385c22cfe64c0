"""Attention, forward and forward+backward, against SDPA, FlexAttention and the eager reference.

Shapes (bf16): ViT-Ti/S/B at 32×32 with 4×4 patches (N = 65, B = 256) and at 224×224 with
16×16 patches (N = 197, B = 128); variants plain, LSA (learnable per-head scale + diagonal
mask) and bias (a learnable [H, N, N] bias, as the Gaussian-mixture mask produces). SDPA runs
with each of its GPU backends (flash, cuDNN, memory-efficient; with the bias as a float mask,
memory-efficient only), around the layout copies a timm block makes. FlexAttention is
compiled once per test (the dynamo cache starts empty) and any recompile while timing fails.
``extra_info["tuned"]``: the candidate Triton's autotuner kept for each tuned kernel at this N
(on a GPU; empty where the first candidate runs).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from benchutil import ATTENTION_SHAPES, DEVICE, DRY, compiled, pick, run

from mgit_fast import functional, reference

SDPA_BACKENDS = pick({"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"},
                     {"math": "MATH"})


def tuned_choices(N):
    """{kernel: the owned-side configs the autotuner kept for sequences of N tokens}."""
    from mgit_fast.kernels.attention import planning

    choices = {}
    for tuner in planning._TUNED.values():
        kept = {f"BLOCK_M={c.kwargs['BLOCK_M']} warps={c.num_warps} stages={c.num_stages}"
                for key, c in tuner.cache.items() if key and key[0] == N}
        if kept:
            choices.setdefault(tuner.base_fn.__name__, []).extend(sorted(kept))
    return choices


def make_inputs(B, N, dim, H, variant, grad):
    qkv = torch.randn(B, N, 3 * dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=grad)
    D = dim // H
    scale = (torch.full((H,), D**-0.5, device=DEVICE)).requires_grad_(grad) if variant == "lsa" else None
    bias = (torch.randn(H, N, N, device=DEVICE) * 0.1).requires_grad_(grad) if variant == "bias" else None
    return qkv, scale, bias


def sdpa_timm_layout(backend):
    """What a timm block does around SDPA (reshape/permute/unbind, then transpose/reshape), on one
    SDPA backend; a bias goes in as a float mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(qkv, H, scale=None, bias=None, diagonal_mask=False):
        B, N, C3 = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if bias is None else bias.to(qkv.dtype).expand(B, -1, -1, -1)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, N, C3 // 3)

    return fn


def flex_layout(H, variant, scale, bias):
    from torch.nn.attention.flex_attention import flex_attention

    flex = compiled(flex_attention, dynamic=False)

    def score_mod(score, b, h, q_idx, kv_idx):
        if variant == "lsa":
            return torch.where(q_idx == kv_idx, -float("inf"), score * scale[h])
        return score + bias[h, q_idx, kv_idx]

    def fn(qkv, *_args, **_kw):
        B, N, C3 = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
        out = flex(q, k, v, score_mod=score_mod, scale=1.0 if variant == "lsa" else None)
        return out.transpose(1, 2).reshape(B, N, C3 // 3)

    return fn


@pytest.mark.parametrize("variant", ["plain", "lsa", "bias"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name, B, N, dim, H", ATTENTION_SHAPES, ids=[s[0] for s in ATTENTION_SHAPES])
def test_attention(benchmark, gpu, name, B, N, dim, H, variant, pass_):
    grad = pass_ == "fwd+bwd"
    qkv, scale, bias = make_inputs(B, N, dim, H, variant, grad)
    options = dict(scale=scale, bias=bias, diagonal_mask=variant == "lsa")
    upstream = torch.randn(B, N, dim, device=DEVICE, dtype=torch.bfloat16)
    leaves = [t for t in (qkv, scale, bias) if t is not None]

    def timed(fn):
        def call():
            out = fn(qkv, H, **options)
            if grad:
                torch.autograd.grad(out, leaves, upstream)
        return call

    peers = {"eager": timed(reference.attention_qkvpacked)}
    if variant == "plain":
        peers.update({f"sdpa_{name}": timed(sdpa_timm_layout(backend)) for name, backend in SDPA_BACKENDS.items()})
    if variant == "bias":
        peers["sdpa_efficient_mask"] = timed(sdpa_timm_layout(pick("EFFICIENT_ATTENTION", "MATH")))
    flex_graphs = None
    if variant != "plain" and not (DRY and grad):  # (no flex backward on the CPU)
        peers["flex"] = flex = timed(flex_layout(H, variant, scale, bias))
        flex()  # compiles
        flex_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert flex_graphs >= 1, "FlexAttention did not compile"

    D = dim // H
    fwd_flops = 4 * B * H * N * N * D
    flops = fwd_flops * (3.5 if grad else 1.0)
    io = B * N * dim * 2  # one [B, N, H·D] bf16 tensor
    nbytes = (3 * io + io) + (2 * (3 * io + io + io) + 3 * io if grad else 0)
    if bias is not None:
        nbytes += H * N * N * 4 * (3 if grad else 1)
    no_recompiles = torch._dynamo.config.patch(error_on_recompile=True) if flex_graphs else contextlib.nullcontext()
    with no_recompiles:
        run(
            benchmark, gpu, timed(lambda *a, **k: functional.attention_qkvpacked(*a, **k, backend="triton")), peers,
            flops=flops, nbytes=nbytes, shape=name, variant=variant, pass_=pass_, batch=B, tokens=N,
            flex_graphs=flex_graphs,
        )
    benchmark.extra_info["tuned"] = tuned_choices(N)
