"""MGiTLoss: the two cross-entropies and the Jensen–Shannon term as one module."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import _checks, functional
from .reference import MGiTLossOutput


class MGiTLoss(nn.Module):
    """``loss = CE(z_P, y) + CE(z_A, y) + js_weight · JSD(softmax(z_P/T) ‖ softmax(z_A/T))``.

    Returns ``MGiTLossOutput(loss, ce_primary, ce_auxiliary, js)``, four 0-dim float32 tensors
    (float64 for float64 logits), all differentiable. The cross-entropies are
    ``F.cross_entropy(z, y, label_smoothing=..., ignore_index=...)``; rows whose target is
    ``ignore_index`` are left out of every mean (a batch with none left gives zeros).
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        js_weight: float = 0.1,
        ignore_index: int = -100,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.label_smoothing = _checks.number("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.temperature = _checks.number("temperature", temperature, low=0.0, low_open=True)
        self.js_weight = _checks.number("js_weight", js_weight)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, logits_primary: Tensor, logits_auxiliary: Tensor, target: Tensor) -> MGiTLossOutput:
        return functional.mgit_loss(
            logits_primary,
            logits_auxiliary,
            target,
            label_smoothing=self.label_smoothing,
            temperature=self.temperature,
            js_weight=self.js_weight,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, temperature={self.temperature}, "
            f"js_weight={self.js_weight}, ignore_index={self.ignore_index}"
        )
