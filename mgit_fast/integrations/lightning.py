"""MGiT as a Lightning ``LightningModule``.

``MGiTModule(primary, scheduler=None, **FusedMGiT options)`` trains ``primary`` (and the
auxiliary ``FusedMGiT`` builds, or one passed as ``auxiliary=``) with manual optimisation: each
training step is ``FusedMGiT``'s fused step, its backward run through ``manual_backward`` and its
update through the optimizer Lightning wraps, so callbacks, precision hooks, ``global_step``,
``max_steps`` and checkpoint names count it. Logged (on the device; Lightning reads them when it
logs): ``train/loss``, ``train/ce_primary``, ``train/ce_auxiliary``, ``train/js``, ``train/mix``,
``train/skipped`` per step and per epoch, and ``val/accuracy``, the primary's, from
``validation_step``. Batches are ``(images, labels)``.

``scheduler``: None, or a function of the optimizer returning a ``torch.optim.lr_scheduler``
scheduler (stepped after every training step) or Lightning's dict
``{"scheduler": ..., "interval": "step" | "epoch"}``. Checkpoints hold both models, the
optimizer (moments, step count, μ's state) and the scheduler; resuming with
``Trainer.fit(..., ckpt_path=...)`` continues as the uninterrupted run would.

``Trainer(strategy="ddp", devices=K)``: Lightning's DistributedDataParallel averages the
gradients, the statistics (and so μ) are averaged across ranks, so K ranks step like one process
on the K-fold batch, as ``FusedMGiT`` under ``torchrun``. Not supported here: ``graph=True``
(Lightning's hooks run inside the step; use ``FusedMGiT`` directly), ``overlap=True`` under DDP,
Lightning's mixed-precision plugins (``amp_dtype=`` gives FusedMGiT's own autocast and loss
scaling; a ``precision`` other than ``"32-true"`` is refused when fitting starts).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn

from ..mgit import FusedMGiT, _logits


class MGiTModule(L.LightningModule):
    def __init__(self, primary: nn.Module, *, scheduler: Optional[Callable[[torch.optim.Optimizer], Any]] = None,
                 **options):
        super().__init__()
        if options.get("graph"):
            raise ValueError("MGiTModule does not capture CUDA graphs (graph=True): Lightning's hooks run inside "
                             "the step; use FusedMGiT(graph=True) in a plain loop")
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"scheduler must be a function of the optimizer, got {type(scheduler).__name__}")
        self.automatic_optimization = False
        self.mgit = FusedMGiT(primary, **options)
        self.mgit._replicas = None  # under Lightning its own DistributedDataParallel averages the gradients
        self.scheduler = scheduler

    def on_fit_start(self) -> None:
        if self.trainer.precision not in ("32-true", "64-true"):
            raise ValueError(f"MGiTModule runs at Trainer(precision='32-true'), got {self.trainer.precision!r}: "
                             "pass amp_dtype=torch.bfloat16 / torch.float16 for FusedMGiT's own autocast and "
                             "loss scaling")

    def forward(self, x: torch.Tensor):
        """The primary's output (inference uses the primary alone)."""
        return self.mgit(x)

    def training_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.mgit._check_batch(x, y)
        optimizer = self.optimizers()
        stats = self.mgit._step(x, y, trainer=(self.manual_backward, optimizer.step, self.trainer.world_size > 1))
        for name, value in stats.items():
            self.log(f"train/{name}", value.float(), on_step=True, on_epoch=True, prog_bar=name == "loss",
                     batch_size=len(y))
        scheduler = self.lr_schedulers()
        if scheduler is not None and self._scheduler_interval() == "step":
            scheduler.step()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self._scheduler_interval() == "epoch":
            scheduler.step()

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        correct = (_logits(self.mgit.primary(x)).argmax(-1) == y).float().mean() * 100
        self.log("val/accuracy", correct, on_epoch=True, sync_dist=True, batch_size=len(y))

    def configure_optimizers(self):
        optimizer = self.mgit.optimizer
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        config = scheduler if isinstance(scheduler, dict) else {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _scheduler_interval(self) -> str:
        return self.trainer.lr_scheduler_configs[0].interval
