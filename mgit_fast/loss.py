"""MGiTLoss: the two cross-entropies and the Jensen–Shannon term as one module."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _checks, functional
from .reference import MGiTLossOutput


class MGiTLoss(nn.Module):
    """``loss = CE(z_P, y) + CE(z_A, y) + js_weight · JSD(softmax(z_P/T) ‖ softmax(z_A/T))``.

    Returns ``MGiTLossOutput(loss, ce_primary, ce_auxiliary, js)``, four 0-dim float32 tensors
    (float64 for float64 logits), all differentiable. The cross-entropies are
    ``F.cross_entropy(z, y, label_smoothing=..., ignore_index=...)``; rows whose target is
    ``ignore_index`` are left out of every mean (a batch with none left gives zeros).
    A label outside ``[0, C)`` raises ``ValueError``: at once on the torch path; on the Triton
    path (which never synchronises) that batch's outputs are NaN and the error is raised by the
    first call after the device has reported it, or by ``check_labels()``. Inside
    ``torch.compile`` (no graph break) only the NaN outputs report it.

    ``temperature`` and ``js_weight`` are floats, or 0-dim float32 tensors on the logits'
    device (not requiring grad) that the Triton kernels read when they run: change one in
    place (``t.fill_(2.0)``, ``t.copy_(...)``) and the next call, or the next replay of a CUDA
    graph that captured this module, uses the new value. A tensor's value is not validated
    (that would synchronise): it must be > 0 for ``temperature`` and finite.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        temperature: Union[float, Tensor] = 1.0,
        js_weight: Union[float, Tensor] = 0.1,
        ignore_index: int = -100,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.label_smoothing = _checks.number("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.temperature = _checks.loss_scalar("temperature", temperature)
        self.js_weight = _checks.loss_scalar("js_weight", js_weight)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, logits_primary: Tensor, logits_auxiliary: Tensor, target: Tensor) -> MGiTLossOutput:
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self._raise_for_finished_check()
        out, invalid = self.counted(logits_primary, logits_auxiliary, target)
        if invalid is not None and not compiling:  # compiled: NaN outputs are the only signal
            self.report(invalid, logits_primary.shape[1])
        return out

    def counted(self, logits_primary: Tensor, logits_auxiliary: Tensor, target: Tensor):
        """``(outputs, invalid)``: the outputs without the label check, and the device count of
        labels outside ``[0, C)`` (None where the torch path has raised for them already, i.e.
        outside ``torch.compile``). Graph-safe: a compiled region returns the count and its
        caller hands it to ``report`` outside (as ``FusedMGiT(compile=True)`` does)."""
        return functional.mgit_loss_checked(
            logits_primary,
            logits_auxiliary,
            target,
            label_smoothing=self.label_smoothing,
            temperature=self.temperature,
            js_weight=self.js_weight,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )

    def report(self, invalid: Tensor, num_classes: int) -> None:
        """Starts the label check of a count from ``counted`` (inside a CUDA graph capture, it
        leaves the check for whoever replays the graph, in ``captured_check``)."""
        if invalid.is_cuda and torch.cuda.is_current_stream_capturing():
            self.captured_check = (invalid, num_classes)
        else:
            self.start_check(invalid, num_classes)

    # Labels outside [0, C) on the Triton path: the kernel counts them on the device and makes
    # that batch's outputs NaN (so the update skips). Each count travels to the host without
    # blocking and waits in a queue (the host may run several steps ahead of the device); the
    # first call after a bad count has arrived raises, and check_labels() waits for them all.
    def start_check(self, invalid: Tensor, num_classes: int) -> None:
        """Starts the label check of one call (``invalid``: the kernel's device count of bad
        labels). Code that replays a CUDA graph which captured this module calls it after each
        replay with ``*captured_check``, which the capture left behind."""
        pending = self.__dict__.setdefault("_pending", [])
        if invalid.device.type == "cpu":
            pending.append((invalid, None, num_classes))
            self._raise_for_finished_check()
            return
        host = torch.empty((), dtype=invalid.dtype, pin_memory=True)
        host.copy_(invalid, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        pending.append((host, event, num_classes))

    def _raise_for_finished_check(self, wait: bool = False) -> None:
        pending = self.__dict__.get("_pending")
        while pending:
            count, event, num_classes = pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            pending.pop(0)
            if float(count) > 0:
                pending.clear()  # later batches ran after the bad one; one error reports it
                raise ValueError(
                    f"target held {int(float(count))} label(s) outside [0, {num_classes}) that are not "
                    f"ignore_index={self.ignore_index}; that batch's losses were NaN and its update was skipped"
                )

    def check_labels(self) -> None:
        """Waits for the label checks of every call so far and raises ``ValueError`` if a
        target was outside ``[0, C)`` (Triton path; the torch path raises at once)."""
        self._raise_for_finished_check(wait=True)

    def __getstate__(self):  # copy.deepcopy, pickling: pending checks stay with the original
        state = dict(self.__dict__)
        state.pop("_pending", None)
        state.pop("captured_check", None)
        return state

    def extra_repr(self) -> str:
        def show(value):  # a tensor's value is not read: that would synchronise
            return f"tensor on {value.device}" if isinstance(value, Tensor) else value

        return (
            f"label_smoothing={self.label_smoothing}, temperature={show(self.temperature)}, "
            f"js_weight={show(self.js_weight)}, ignore_index={self.ignore_index}"
        )
