"""FusedMGiT: a primary ViT, its auxiliary, the MGiT loss and the multi-gradient update."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _checks
from .attention import FusedAttention
from .loss import MGiTLoss
from .models.auxiliary import make_auxiliary
from .optim import MultiGradientAdamW, Pairing


def _world_size() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def autocast_dtype(amp_dtype: Optional[torch.dtype], device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype for a step: ``None`` → bfloat16 on CUDA GPUs that support it, else no
    autocast; ``torch.float32`` → no autocast; ``torch.bfloat16`` → bfloat16."""
    if amp_dtype is None:
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if amp_dtype == torch.float32:
        return None
    if amp_dtype == torch.bfloat16:
        return torch.bfloat16
    if amp_dtype == torch.float16:
        raise ValueError("amp_dtype=torch.float16 needs loss scaling, which FusedMGiT does not do; use torch.bfloat16")
    raise TypeError(f"amp_dtype must be None, torch.float32 or torch.bfloat16, got {amp_dtype!r}")


class FusedMGiT(nn.Module):
    """MGiT training of ``primary`` beside a compact ``auxiliary`` (DESIGN §1).

    ``forward(x)`` is the primary's logits (inference uses the primary alone).
    ``training_step(x, y)`` runs both models, the fused loss (two label-smoothed
    cross-entropies plus ``js_weight`` times the Jensen–Shannon divergence at ``temperature``),
    one backward, and one ``MultiGradientAdamW`` update; it returns 0-dim device tensors
    ``loss, ce_primary, ce_auxiliary, js, mix, skipped`` and never synchronises with the host.

    ``auxiliary=None`` builds one with ``make_auxiliary(primary, aux_depth, seed=aux_seed)``.
    ``backend`` (``"torch"``/``"triton"``/None) is applied to the loss, the update and every
    ``FusedAttention`` of both models. ``amp_dtype``: see ``autocast_dtype``.
    ``state_dict()`` holds both models, the optimizer and the step count: saving, loading into
    a model built the same way, and stepping equals an uninterrupted run bit for bit.

    Under ``torch.distributed`` (e.g. ``torchrun``; initialise the process group first), both
    models are wrapped in ``DistributedDataParallel``: each rank passes its share of the batch,
    gradients are averaged across ranks, and μ and the returned values come from the losses
    averaged across ranks, so K ranks step like one process on the K-fold batch (equal shares,
    no ignored labels).
    """

    def __init__(
        self,
        primary: nn.Module,
        auxiliary: Optional[nn.Module] = None,
        *,
        aux_depth: int = 1,
        aux_seed: Optional[int] = None,
        lr: Union[float, Tensor] = 1e-3,
        weight_decay: float = 0.05,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        label_smoothing: float = 0.1,
        temperature: float = 1.0,
        js_weight: float = 0.1,
        pairing: Pairing = "head",
        mix: Union[str, float] = "adaptive",
        mix_max: float = 0.5,
        average: float = 0.0,
        max_grad_norm: Optional[float] = None,
        amp_dtype: Optional[torch.dtype] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(primary, nn.Module):
            raise TypeError(f"primary must be an nn.Module, got {type(primary).__name__}")
        self.primary = primary
        self.auxiliary = auxiliary if auxiliary is not None else make_auxiliary(primary, aux_depth, seed=aux_seed)
        autocast_dtype(amp_dtype, "cpu")  # validates
        self.amp_dtype = amp_dtype
        self.criterion = MGiTLoss(label_smoothing, temperature, js_weight, backend=backend)
        self.optimizer = MultiGradientAdamW(
            self.primary,
            self.auxiliary,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            pairing=pairing,
            mix=mix,
            mix_max=mix_max,
            average=average,
            max_grad_norm=max_grad_norm,
            backend=backend,
        )
        if backend is not None:
            for module in list(self.primary.modules()) + list(self.auxiliary.modules()):
                if isinstance(module, FusedAttention):
                    module.backend = backend
        # Under torch.distributed, DistributedDataParallel averages both models' gradients
        # across ranks during the backward (the wrappers are kept out of the state_dict).
        self._replicas: Optional[Tuple[nn.Module, nn.Module]] = None
        if _world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            device = next(self.primary.parameters()).device
            ids = [device.index] if device.type == "cuda" else None
            self._replicas = (
                DistributedDataParallel(self.primary, device_ids=ids),
                DistributedDataParallel(self.auxiliary, device_ids=ids),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.primary(x)

    def training_step(self, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
        """One MGiT step on the batch ``(x, y)``; returns detached 0-dim device tensors."""
        _checks.tensor("x", x)
        _checks.tensor("y", y, ndim=1, dtypes=_checks.LABEL_DTYPES)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels but x holds {x.shape[0]} images")
        _checks.same_device("y", y, "x", x)
        device = self.optimizer.step_count.device
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the models are on {device}")

        self.optimizer.zero_grad(set_to_none=True)
        amp = autocast_dtype(self.amp_dtype, x.device.type)
        autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        primary, auxiliary = self._replicas or (self.primary, self.auxiliary)
        with autocast:
            logits_primary = primary(x)
            logits_auxiliary = auxiliary(x)
        out = self.criterion(logits_primary, logits_auxiliary, y)
        out.loss.backward()
        stats = torch.stack([o.detach() for o in out])  # loss, ce_primary, ce_auxiliary, js
        if self._replicas is not None:  # μ and the reported values from the global batch
            torch.distributed.all_reduce(stats)
            stats /= _world_size()
        loss, ce_primary, ce_auxiliary, js = stats.unbind(0)
        update = self.optimizer.step(ce_primary, ce_auxiliary)
        return {
            "loss": loss,
            "ce_primary": ce_primary,
            "ce_auxiliary": ce_auxiliary,
            "js": js,
            "mix": update.mix,
            "skipped": update.skipped,
        }

    # the optimizer is state too: it travels in the module's state_dict and follows .to()
    def get_extra_state(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            for state in optimizer.state.values():
                for key, value in state.items():
                    state[key] = fn(value)
            for name in ("step_count", "skipped_steps", "last_mix"):
                setattr(optimizer, name, fn(getattr(optimizer, name)))
        return self
