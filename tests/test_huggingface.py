"""transformers' own vision models (the installed release, randomly initialised, tiny) with the
fused attention chosen through their attention registry, on the CPU: the reference backend and
the Triton kernel under the interpreter, against transformers' eager attention."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close

pytest.importorskip("transformers", reason="the huggingface extra (installed with the test extra)")
from transformers import (Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mgit_fast import FusedMGiT, make_auxiliary
from mgit_fast.integrations import huggingface

ROOT = Path(__file__).resolve().parents[1]
huggingface.register()


def vit(**overrides):
    config = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(ViTConfig(**{**config, **overrides}))


def dinov2(**overrides):
    config = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  mlp_ratio=1, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Dinov2ForImageClassification(Dinov2Config(**{**config, **overrides}))


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make", [vit, dinov2], ids=["vit", "dinov2"])
def test_logits_and_gradients_equal_eager_attention(make, backend):
    reference = make().train()
    reference.set_attn_implementation("eager")
    fused = copy.deepcopy(reference)
    fused.set_attn_implementation(huggingface.name_for(backend))
    x = torch.randn(3, 3, 32, 32)
    ref, out = reference(x).logits, fused(x).logits
    assert_rel_close(out, ref, 1e-5, "logits")
    weights = torch.randn_like(ref)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    expected, got = _grads(reference), _grads(fused)
    assert got.keys() == expected.keys() and any(".q_proj." in name for name in got)
    scale = max(float(g.abs().max()) for g in expected.values())
    for name in expected:  # k_proj's bias has no gradient in exact arithmetic: an absolute floor
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_from_pretrained_with_the_attention_implementation(tmp_path):
    model = vit().eval()
    model.save_pretrained(tmp_path)
    loaded = ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="mgit_fast_torch").eval()
    assert loaded.config._attn_implementation == "mgit_fast_torch"
    x = torch.randn(2, 3, 32, 32)
    model.set_attn_implementation("eager")
    assert_rel_close(loaded(x).logits, model(x).logits, 1e-5, "logits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_masks_as_sdpa_takes_them(backend):
    """A boolean mask (True attends, as transformers' sdpa masks are) and a float additive mask,
    per batch and broadcast over heads, against transformers' own sdpa function."""
    module = torch.nn.Module()
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    keep = torch.rand(2, 1, 9, 9) > 0.3
    keep[..., 0] = True  # every query attends to something
    for mask in (keep, torch.randn(2, 1, 9, 9), keep[:, :, :1, :]):
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
        out, weights = huggingface.attention_forward(module, q, k, v, mask, scaling=0.3, backend=backend)
        assert weights is None and out.shape == ref.shape == (2, 9, 2, 16)
        assert_rel_close(out, ref, 1e-5, str(mask.dtype))


def test_what_the_kernel_does_not_compute_is_refused():
    model = vit(attention_probs_dropout_prob=0.1)
    model.set_attn_implementation("mgit_fast")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="dropout"):
        model.train()(x)
    model.eval()(x)  # no dropout in evaluation
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)
    q = torch.randn(1, 2, 5, 16)
    causal = torch.nn.Module()
    causal.is_causal = True
    with pytest.raises(ValueError, match="causal"):
        huggingface.attention_forward(causal, q, q, q, None)
    with pytest.raises(ValueError, match="key/value heads"):
        huggingface.attention_forward(torch.nn.Module(), q, q[:, :1], q[:, :1], None)
    with pytest.raises(ValueError, match="attention_mask"):
        huggingface.attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 5, 5, dtype=torch.bool))


@pytest.mark.parametrize("make", [vit, dinov2], ids=["vit", "dinov2"])
def test_fused_mgit_trains_a_transformers_model(make):
    torch.manual_seed(0)
    primary = make(num_hidden_layers=3)
    mgit = FusedMGiT(primary, aux_depth=1, aux_seed=1, lr=3e-3)
    assert primary.config._attn_implementation == mgit.auxiliary.config._attn_implementation == "mgit_fast"
    assert mgit.auxiliary.config.num_hidden_layers == 1 and primary.config.num_hidden_layers == 3
    named = dict(primary.named_parameters())
    paired = [name for name, p in named.items() if any(p is primary_p for primary_p in
                                                       [mgit.optimizer.named_primary[i][1] for i, _ in mgit.optimizer.pairs])]
    assert sorted(paired) == ["classifier.bias", "classifier.weight"]
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = [float(mgit.training_step(x, y)["ce_primary"]) for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0]
    assert mgit(x).logits.shape == (16, 10)


def test_auxiliary_of_a_transformers_model_is_freshly_initialised():
    primary = vit(num_hidden_layers=3)
    auxiliary = make_auxiliary(primary, 1, seed=5)
    assert len(auxiliary.vit.layers) == 1 and auxiliary.config.num_hidden_layers == 1
    assert all(torch.equal(a, b) for a, b in zip(auxiliary.parameters(), make_auxiliary(primary, 1, seed=5).parameters()))
    named = dict(primary.named_parameters())
    for name, p in auxiliary.named_parameters():  # every tensor drawn at random is drawn again
        if p.numel() > 1 and p.std() > 0:
            assert not torch.equal(p, named[name]), name


def test_transformers_imports_from_the_repository_root():
    """kernels/ (mgit_fast.kernels) must not shadow Hugging Face's `kernels`, which transformers
    imports, when the repository root is on sys.path; with no other `kernels` it is not one."""
    code = ("from transformers import ViTForImageClassification; import kernels, mgit_fast.kernels.attention; "
            "import os; assert os.path.dirname(kernels.__file__) != os.path.abspath('kernels'), kernels.__file__; "
            "assert hasattr(kernels, 'CUDAProperties')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    alone = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert alone.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in alone.stderr, alone.stderr
