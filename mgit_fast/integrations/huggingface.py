"""The fused attention as a Hugging Face ``transformers`` attention implementation.

``register()`` adds it to transformers' ``AttentionInterface`` (and the matching mask function to
``AttentionMaskInterface``) under three names: ``"mgit_fast"`` (the Triton kernel on CUDA
tensors, the plain-PyTorch reference elsewhere, as everywhere in mgit_fast),
``"mgit_fast_triton"`` and ``"mgit_fast_torch"``. Any model that dispatches its attention through
that registry (ViT, DeiT, Dinov2, ViT-MSN, I-JEPA, ...) then runs it::

    from mgit_fast.integrations import huggingface
    huggingface.register()
    model = ViTForImageClassification.from_pretrained(name, attn_implementation="mgit_fast")
    # or, on a model already built: model.set_attn_implementation("mgit_fast")

``FusedMGiT`` does this itself for a transformers primary. What the kernel does not compute is
refused with a ``ValueError`` rather than computed differently: attention dropout in training,
causal attention, ``output_attentions=True``, key/value heads fewer than query heads, keys of
another length than the queries, and the other options of ``sdpa`` it lacks (softcap, sliding
window, attention sinks). A padding mask is taken: a boolean mask (True attends) becomes an
additive bias of 0 and −1e30, a float mask is added to the scores as eager attention does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import functional

NAMES = {"mgit_fast": None, "mgit_fast_triton": "triton", "mgit_fast_torch": "torch"}
MASKED = -1e30  # a score bias that removes a key (finite: a row with nothing to attend stays finite)
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "position_bias")


def name_for(backend: Optional[str]) -> str:
    """The registered name that runs ``backend`` (None: the default choice)."""
    return next(name for name, b in NAMES.items() if b == backend)


def _bias(attention_mask: Optional[Tensor], B: int, H: int, N: int) -> Optional[Tensor]:
    """transformers' attention mask as the additive score bias the kernel takes: [B|1, H|1, N, N]."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != N or attention_mask.shape[-2] not in (1, N) \
            or attention_mask.shape[0] not in (1, B) or attention_mask.shape[1] not in (1, H):
        raise ValueError(f"attention_mask must be [B|1, H|1, N|1, N] = [{B}|1, {H}|1, {N}|1, {N}], "
                         f"got {list(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, device=attention_mask.device, dtype=torch.float32)
        bias = bias.masked_fill(~attention_mask, MASKED)
    elif attention_mask.is_floating_point():
        bias = attention_mask
    else:
        raise TypeError(f"attention_mask must be bool or floating point, got {attention_mask.dtype}")
    return bias.expand(*bias.shape[:2], N, N)


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                      *, backend: Optional[str] = None, **kwargs):
    """transformers' attention-function contract: ``query, key, value`` ``[B, H, N, D]``; returns
    ``(out [B, N, H, D], None)`` (no attention weights are formed)."""
    if dropout:
        raise ValueError(f"mgit_fast attention has no attention dropout, got dropout={dropout} in training: set the "
                         "model config's attention dropout (attention_probs_dropout_prob or attention_dropout) to 0")
    causal = kwargs.get("is_causal")
    if causal if causal is not None else getattr(module, "is_causal", False):
        raise ValueError("mgit_fast attention is bidirectional (vision encoders); this module asks for causal attention")
    if kwargs.get("output_attentions"):
        raise ValueError("mgit_fast attention forms no attention weights: output_attentions=True needs "
                         "attn_implementation='eager'")
    for option in _UNSUPPORTED:
        if kwargs.get(option) is not None:
            raise ValueError(f"mgit_fast attention does not support {option}")
    B, H, N, _ = query.shape
    if key.shape[1] != H or value.shape[1] != H:
        raise ValueError(f"mgit_fast attention needs as many key/value heads as query heads ({H}), got {key.shape[1]}")
    if key.shape[2] != N:
        raise ValueError(f"mgit_fast attention needs keys of the queries' length {N}, got {key.shape[2]}")
    out = functional.attention(query, key, value, scale=scaling, bias=_bias(attention_mask, B, H, N), backend=backend)
    return out.transpose(1, 2), None


def register() -> None:
    """Registers the three names with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, backend in NAMES.items():
        def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, _backend=backend, **kwargs):
            return attention_forward(module, query, key, value, attention_mask, scaling, dropout, backend=_backend,
                                     **kwargs)

        forward.__name__ = forward.__qualname__ = f"{name}_attention_forward"
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, sdpa_mask)  # boolean masks (True attends), None where none is needed


def is_transformers_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a transformers model that chooses its attention through the registry."""
    return callable(getattr(model, "set_attn_implementation", None)) and hasattr(getattr(model, "config", None),
                                                                                 "_attn_implementation")
