"""FusedMGiT: a primary ViT, its auxiliary, the MGiT loss and the multi-gradient update."""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _checks, functional
from .attention import FusedAttention
from .integrations import huggingface
from .loss import MGiTLoss
from .models.auxiliary import make_auxiliary
from .optim import MultiGradientAdamW, Pairing
from .patching import patch_vit


def _world_size() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def _is_cuda(x: Tensor) -> bool:
    return x.is_cuda


def autocast_dtype(amp_dtype: Optional[torch.dtype], device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype for a step: ``None`` → bfloat16 on CUDA GPUs that support it, else no
    autocast; ``torch.float32`` → no autocast; ``torch.bfloat16``/``torch.float16`` → that."""
    if amp_dtype is None:
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if amp_dtype == torch.float32:
        return None
    if amp_dtype in (torch.bfloat16, torch.float16):
        return amp_dtype
    raise TypeError(f"amp_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {amp_dtype!r}")


class LossScale:
    """Dynamic loss scaling for float16 autocast, on the device (as ``torch.amp.GradScaler``):
    the backward runs on ``loss · scale``; the update divides the gradients by ``scale`` and
    skips on overflow; then ``scale`` halves after a skipped step and doubles after
    ``growth_interval`` clean steps in a row."""

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def update(self, skipped: Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.clean_steps, skipped.float(), 2.0, 0.5, self.growth_interval)


def _logits(out) -> Tensor:
    """A model's logits: its output, or the ``.logits`` of a transformers output."""
    return out if isinstance(out, Tensor) else out.logits


class FusedMGiT(nn.Module):
    """MGiT training of ``primary`` beside a compact ``auxiliary`` (DESIGN §1).

    ``forward(x)`` is the primary's logits (inference uses the primary alone).
    ``training_step(x, y)`` runs both models, the fused loss (two label-smoothed
    cross-entropies plus ``js_weight`` times the Jensen–Shannon divergence at ``temperature``),
    one backward, and one ``MultiGradientAdamW`` update; it returns 0-dim device tensors
    ``loss, ce_primary, ce_auxiliary, js, mix, skipped`` and never synchronises with the host.

    ``auxiliary=None`` builds one with ``make_auxiliary(primary, aux_depth, seed=aux_seed)``.
    ``fuse_attention`` (default) swaps every timm-style attention module of both models for
    ``FusedAttention`` in place, keeping the weights (``patch_vit``); a model it cannot swap
    (attention dropout, q/k norm) raises ``ValueError``: pass ``fuse_attention=False`` to keep
    the model's own attention. A transformers vision model (ViT, DeiT, Dinov2, ...) instead gets
    ``set_attn_implementation("mgit_fast")`` (``mgit_fast.integrations.huggingface``); its
    ``.logits`` are the logits.
    ``backend`` (``"torch"``/``"triton"``/None) is applied to the loss, the update and every
    ``FusedAttention`` of both models. ``amp_dtype``: see ``autocast_dtype``; float16 adds
    dynamic loss scaling on the device (``loss_scale``, a ``LossScale``; overflowing steps are
    skipped and counted in ``optimizer.skipped_steps``).
    ``state_dict()`` holds both models, the optimizer and the step count: saving, loading into
    a model built the same way, and stepping equals an uninterrupted run bit for bit.

    ``graph=True`` (CUDA, Triton backend): for each batch signature (shapes, dtypes, training
    mode, hyperparameters) the first ``graph_warmup`` steps run eagerly, then the whole step is
    captured in one CUDA graph and replayed for later batches of that signature; a batch of
    another shape (a short last batch) runs eagerly. The learning rates, ``js_weight``,
    ``temperature``, a fixed ``mix``, ``mix_max``, ``average`` and ``max_grad_norm`` are read
    from device tensors refreshed before each step, so schedules on them (setting
    ``criterion.js_weight``, ``optimizer.max_grad_norm``, ... or a scheduler on ``lr``) replay
    the same graph; switching clipping on or off, between adaptive and fixed μ, or any other
    hyperparameter re-captures. Call ``reset_graph()`` after replacing parameters by hand.
    ``overlap=True`` (CUDA) runs the auxiliary's forward and backward on a second CUDA stream,
    concurrently with the primary's (the results are those of ``overlap=False``).
    ``compile=True``: both models' forwards and the loss run as one ``torch.compile`` graph
    (fullgraph, static shapes, Inductor's default mode; the kernels are custom ops in it),
    compiled by the first ``training_step`` (``compile_seconds``: that step's forward and
    backward; ``compiles``: graphs built). Later, a call that would compile again (another batch
    shape, eval mode, a changed structural setting) runs eagerly. Under ``torch.distributed``
    each DDP-wrapped model is compiled on its own. With ``graph=True`` the compiled step is
    captured like the eager one. Not with ``overlap=True``.

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
        graph: bool = False,
        graph_warmup: int = 3,
        overlap: bool = False,
        fuse_attention: bool = True,
        compile: bool = False,
    ):
        super().__init__()
        if not isinstance(primary, nn.Module):
            raise TypeError(f"primary must be an nn.Module, got {type(primary).__name__}")
        if auxiliary is not None and not isinstance(auxiliary, nn.Module):
            raise TypeError(f"auxiliary must be an nn.Module or None, got {type(auxiliary).__name__}")
        if fuse_attention:  # timm-style attention → FusedAttention, in place (checked before any swap)
            models = [m for m in (primary, auxiliary) if m is not None and not huggingface.is_transformers_model(m)]
            for dry_run in (True, False):
                for model in models:
                    patch_vit(model, backend=backend, dry_run=dry_run)
        self.primary = primary
        self.auxiliary = auxiliary if auxiliary is not None else make_auxiliary(primary, aux_depth, seed=aux_seed)
        transformers_models = [m for m in (self.primary, self.auxiliary) if huggingface.is_transformers_model(m)]
        if fuse_attention and transformers_models:  # the fused attention through their attention registry
            huggingface.register()
            for model in transformers_models:
                model.set_attn_implementation(huggingface.name_for(backend))
        autocast_dtype(amp_dtype, "cpu")  # validates
        self.amp_dtype = amp_dtype
        device = next(primary.parameters()).device
        self.loss_scale = LossScale(device) if amp_dtype == torch.float16 else None
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
        if not isinstance(graph, bool) or not isinstance(overlap, bool):
            raise TypeError("graph and overlap must be bools")
        if isinstance(graph_warmup, bool) or not isinstance(graph_warmup, int) or graph_warmup < 1:
            raise ValueError(f"graph_warmup must be an int >= 1, got {graph_warmup!r}")
        if graph and _world_size() > 1:
            raise ValueError("graph=True is not supported under torch.distributed (DDP's hooks are not captured)")
        self.graph, self.graph_warmup, self.overlap = graph, graph_warmup, overlap
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
        if compile and overlap:
            raise ValueError("compile=True cannot be combined with overlap=True: the compiled graph runs both models "
                             "on one stream")
        self.use_compile = compile
        self.compile_seconds: Optional[float] = None  # the first compiled step's forward + backward
        self.compiles = 0  # graphs torch.compile built for this module's steps
        self._compiled: Optional[Callable] = None
        self._compiled_once = False
        self._captured: Optional[_CapturedStep] = None
        self._warming: Tuple[Any, int] = (None, 0)
        self._side_stream = None
        self._hyperparameters: Dict[Tuple[str, str], Tuple[Tensor, float]] = {}  # (device tensor, its value)
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
        """One MGiT step on the batch ``(x, y)``; returns detached 0-dim device tensors. An empty
        batch is refused. A batch whose labels are all ``ignore_index`` has no loss gradient,
        but the update still runs, as a zero-gradient ``torch.optim.AdamW`` step would: weight
        decay and the moments' momentum move the weights, and the step count advances."""
        self._check_batch(x, y)
        if self.graph and _is_cuda(x):
            return self._graph_step(x, y)
        return self._step(x, y)

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        _checks.tensor("x", x)
        if x.dtype == torch.float64 and (dtype := next(self.primary.parameters()).dtype) != torch.float64:
            raise TypeError(f"x must have the models' dtype {dtype} (or a lower precision under autocast), got float64")
        _checks.tensor("y", y, ndim=1, dtypes=_checks.LABEL_DTYPES)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels but x holds {x.shape[0]} images")
        if x.shape[0] == 0:  # a step would still move every weight (weight decay, momentum)
            raise ValueError("x holds no images (batch size 0)")
        _checks.same_device("y", y, "x", x)
        device = self.optimizer.step_count.device
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the models are on {device}")

    def _step(self, x: Tensor, y: Tensor, hyperparameters: Optional[Dict[Tuple[str, str], Tensor]] = None,
              trainer: Optional[Tuple[Callable, Callable, bool]] = None) -> Dict[str, Tensor]:
        """One eager step. ``trainer``: (backward(loss), step(**optimizer.step's arguments),
        whether to average the statistics across ranks) of a trainer that owns the backward, the
        optimizer step and the gradient averaging (Lightning: ``manual_backward``, its wrapped
        optimizer's ``step``, its DistributedDataParallel)."""
        # gradients start as None, so autograd writes fresh ones instead of zeroing and adding
        # (16 B/param less); inside a capture they come from the graph's private pool, where
        # every replay writes them again at the captured addresses
        self.optimizer.zero_grad(set_to_none=True)
        amp = autocast_dtype(self.amp_dtype, x.device.type)
        streams = None
        started = time.perf_counter() if self.use_compile and not self._compiled_once else None
        if self.use_compile:
            if hyperparameters is None:  # the graph reads them from device tensors: a schedule does not recompile
                hyperparameters = self._hyperparameter_tensors()
            out = self._compiled_losses(x, y, hyperparameters)
        else:
            primary, auxiliary = self._replicas or (self.primary, self.auxiliary)
            streams = self._fork(x)  # overlap: before the primary's forward, so both models run at once
            autocast = self._autocast(x)
            with autocast:
                logits_primary = _logits(primary(x))
            if streams is None:
                with autocast:
                    logits_auxiliary = _logits(auxiliary(x))
            else:  # the auxiliary on the side stream; autograd runs its backward there too
                current, side = streams
                with torch.cuda.stream(side), autocast:
                    logits_auxiliary = _logits(auxiliary(x))
                current.wait_stream(side)  # the loss reads both logits
                logits_auxiliary.record_stream(current)
            with self._reading(hyperparameters):
                out = self.criterion(logits_primary, logits_auxiliary, y)
        scale = self.loss_scale.scale if amp == torch.float16 else None
        backward, optimizer_step, reduce = trainer or (Tensor.backward, self.optimizer.step, self._replicas is not None)
        backward(out.loss if scale is None else out.loss * scale)
        if started is not None and self._compiled_once:  # the first compiled forward and backward (both compile)
            self.compile_seconds = time.perf_counter() - started
        if streams is not None:
            current.wait_stream(side)  # the auxiliary's gradients are complete before the update
        stats = torch.stack([o.detach() for o in out])  # loss, ce_primary, ce_auxiliary, js
        if reduce:  # μ and the reported values from the global batch
            torch.distributed.all_reduce(stats)
            stats /= _world_size()
        loss, ce_primary, ce_auxiliary, js = stats.unbind(0)
        with self._reading(hyperparameters):
            update = optimizer_step(ce_primary=ce_primary, ce_auxiliary=ce_auxiliary, grad_scale=scale)
        if scale is not None:
            self.loss_scale.update(update.skipped)
        mix = update.mix
        if hyperparameters and any(mix.data_ptr() == t.data_ptr() for t in hyperparameters.values()):
            mix = mix.clone()  # a fixed μ may come back as (a view of) the tensor a schedule refills
        return {
            "loss": loss,
            "ce_primary": ce_primary,
            "ce_auxiliary": ce_auxiliary,
            "js": js,
            "mix": mix,
            "skipped": update.skipped,
        }

    def _autocast(self, x: Tensor):
        amp = autocast_dtype(self.amp_dtype, x.device.type)
        if amp is None:
            return contextlib.nullcontext()
        # no cast cache: the cached copies would outlive a graph capture
        return torch.autocast(x.device.type, dtype=amp, cache_enabled=not self.graph)

    # ---------------------------------------------------------------- torch.compile
    def _losses(self, x: Tensor, y: Tensor, models: Optional[Tuple[nn.Module, nn.Module]] = None):
        """What ``compile=True`` compiles: both models' forwards and the loss, with the count of
        invalid labels (checked outside) and the number of classes."""
        primary, auxiliary = models or self._replicas or (self.primary, self.auxiliary)
        with self._autocast(x):
            logits_primary = _logits(primary(x))
            logits_auxiliary = _logits(auxiliary(x))
        out, invalid = self.criterion.counted(logits_primary, logits_auxiliary, y)
        return out, invalid, logits_primary.shape[1]

    def _compiled_losses(self, x: Tensor, y: Tensor, hyperparameters: Dict[Tuple[str, str], Tensor]):
        """``_losses`` through ``torch.compile`` (fullgraph, static shapes), compiled on the first
        call. Later, a call that would compile again (a batch of another shape, such as a short
        last batch; the models in eval mode; a changed structural setting) runs eagerly instead."""
        from torch._dynamo.utils import counters

        self.criterion._raise_for_finished_check()
        if self._compiled is None:
            if self._replicas is None:
                self._compiled = torch.compile(self._losses, fullgraph=True, dynamic=False)
            else:  # DistributedDataParallel's forward runs eagerly around each model's compiled forward
                models = tuple(torch.compile(m, dynamic=False) for m in self._replicas)
                self._compiled = functools.partial(self._losses, models=models)
        graphs = counters["stats"]["unique_graphs"]
        stance = torch.compiler.set_stance("eager_on_recompile") if self._compiled_once else contextlib.nullcontext()
        with stance, self._reading(hyperparameters):
            out, invalid, num_classes = self._compiled(x, y)
        self._compiled_once = True
        self.compiles += counters["stats"]["unique_graphs"] - graphs
        if invalid is not None:  # the label check, outside the graph
            self.criterion.report(invalid, num_classes)
            if functional.resolve_backend(self.criterion.backend, x.device.type) == "torch":
                self.criterion.check_labels()  # the torch path raises at once, before the backward
        return out

    def _fork(self, x: Tensor) -> Optional[Tuple[Any, Any]]:
        """With ``overlap`` on CUDA: (current stream, side stream), the side stream ordered after
        everything the current one has queued (the batch, the zeroed gradients, the last
        update); else None."""
        if not (self.overlap and _is_cuda(x)):
            return None
        current = torch.cuda.current_stream(x.device)
        if self._side_stream is None or self._side_stream.device != x.device:
            self._side_stream = torch.cuda.Stream(x.device)
        side = self._side_stream
        side.wait_stream(current)
        x.record_stream(side)  # the auxiliary reads x on the side stream, forward and backward
        return current, side

    # ---------------------------------------------------------------- CUDA graphs
    def _hyperparameter_tensors(self) -> Dict[Tuple[str, str], Tensor]:
        """The hyperparameters a captured step reads at run time, keyed ``(owner, name)``:
        ``criterion``'s ``js_weight`` and ``temperature``, ``optimizer``'s ``mix`` (when fixed),
        ``mix_max``, ``average`` and ``max_grad_norm`` (when clipping), as 0-dim float32 device
        tensors that this module owns, refreshed in place (no synchronisation) from the values
        those modules hold now; a value given as a tensor is used as it is."""
        device = self.optimizer.step_count.device
        cache, tensors = self._hyperparameters, {}
        for (owner, name), bounds in HYPERPARAMETERS.items():
            value = getattr(getattr(self, owner), name)
            if value is None or isinstance(value, (str, Tensor)):  # structural, or the user's tensor
                if isinstance(value, Tensor):
                    tensors[owner, name] = value
                continue
            value = _checks.number(name, value, **bounds)
            held = cache.get((owner, name))
            if held is None or held[0].device != device:
                held = (torch.full((), value, dtype=torch.float32, device=device), value)
            elif held[1] != value:
                held[0].fill_(value)
                held = (held[0], value)
            cache[owner, name] = held
            tensors[owner, name] = held[0]
        return tensors

    @contextlib.contextmanager
    def _reading(self, tensors: Optional[Dict[Tuple[str, str], Tensor]]):
        """The loss and the update read ``tensors`` in place of their float hyperparameters
        (which are back when the block ends, for the next refresh)."""
        saved = []
        try:
            for (owner, name), tensor in (tensors or {}).items():
                module = getattr(self, owner)
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, tensor)
            yield
        finally:
            for module, name, value in reversed(saved):
                setattr(module, name, value)

    def _signature(self, x: Tensor, y: Tensor) -> Tuple[Any, Any]:
        """(what the batch looks like, what the captured kernels have baked in). The values in
        ``HYPERPARAMETERS`` are read from device tensors, so only their structure counts:
        adaptive or fixed μ, clipping on or off, and which tensor a user's tensor value is."""
        batch = (x.shape, x.dtype, x.stride(), y.shape, y.dtype, x.device, self.primary.training, self.auxiliary.training)
        o, c = self.optimizer, self.criterion

        def structure(value):
            if value is None or isinstance(value, str):
                return value
            return id(value) if isinstance(value, Tensor) else "read from a device tensor"

        baked = (
            o.betas, o.eps,
            tuple(structure(getattr(getattr(self, owner), name)) for owner, name in HYPERPARAMETERS),
            tuple((g["weight_decay"], id(g["lr"]) if isinstance(g["lr"], Tensor) else None) for g in o.param_groups),
            c.label_smoothing, c.ignore_index, self.amp_dtype, self.overlap,
            self.loss_scale.growth_interval if self.loss_scale is not None else None,
        )
        return batch, baked

    def _graph_step(self, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
        hyperparameters = self._hyperparameter_tensors()  # refreshed here, outside any capture
        signature = self._signature(x, y)
        captured = self._captured
        if captured is not None:
            if captured.signature == signature:
                return captured.replay(self, x, y)
            if captured.signature[0] != signature[0]:
                return self._step(x, y, hyperparameters)  # another batch shape: eager, the graph is kept
            self.reset_graph()  # same batches, a structural change: capture again
        if not self.optimizer.use_kernel or functional.resolve_backend(self.criterion.backend, "cuda") != "triton":
            raise ValueError("graph=True needs the Triton loss and update (backend='triton' or None)")
        seen, count = self._warming
        count = count + 1 if seen == signature else 1
        self._warming = (signature, count)
        if count <= self.graph_warmup:
            # warm-up on a side stream (compiles the kernels, creates every lasting buffer)
            current = torch.cuda.current_stream()
            warmup = torch.cuda.Stream(x.device)
            warmup.wait_stream(current)
            with torch.cuda.stream(warmup):
                stats = self._step(x, y, hyperparameters)
            current.wait_stream(warmup)
            return stats
        self.criterion.check_labels()  # nothing may synchronise during the capture
        self._captured = _CapturedStep(self, x, y, signature, hyperparameters)
        return self._captured.replay(self, x, y)

    def reset_graph(self) -> None:
        """Drops the captured step (it is captured again after the warm-up)."""
        self._captured = None
        self._warming = (None, 0)

    def __getstate__(self) -> Dict[str, Any]:  # copy.deepcopy, pickling: without the graph
        state = dict(self.__dict__)
        state.update(_captured=None, _warming=(None, 0), _side_stream=None, _hyperparameters={}, _compiled=None,
                     _compiled_once=False)
        return state

    # the optimizer is state too: it travels in the module's state_dict and follows .to()
    def get_extra_state(self) -> Dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.loss_scale is not None:
            state["loss_scale"] = (self.loss_scale.scale.clone(), self.loss_scale.clean_steps.clone())
        return state

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.loss_scale is not None and "loss_scale" in state:
            scale, clean_steps = state["loss_scale"]
            self.loss_scale.scale.copy_(scale)
            self.loss_scale.clean_steps.copy_(clean_steps)

    def _apply(self, fn, *args, **kwargs):
        if hasattr(self, "_captured"):  # the graph holds the old tensors' addresses
            self.reset_graph()
            self._hyperparameters = {}
            self._compiled_once = False  # on another device or dtype, compiling again is allowed
        super()._apply(fn, *args, **kwargs)
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            for state in optimizer.state.values():
                for key, value in state.items():
                    state[key] = fn(value)
            for name in ("step_count", "skipped_steps", "last_mix"):
                setattr(optimizer, name, fn(getattr(optimizer, name)))
            for name in ("mix", "mix_max", "average", "max_grad_norm"):  # given as device tensors
                value = getattr(optimizer, name)
                if isinstance(value, torch.Tensor):
                    setattr(optimizer, name, fn(value))
        loss_scale = getattr(self, "loss_scale", None)
        if loss_scale is not None:
            loss_scale.scale, loss_scale.clean_steps = fn(loss_scale.scale), fn(loss_scale.clean_steps)
        return self


STAT_KEYS = ("loss", "ce_primary", "ce_auxiliary", "js", "mix")
# what graph=True reads from device tensors (_hyperparameter_tensors), with each value's bounds
HYPERPARAMETERS = {
    ("criterion", "js_weight"): {},
    ("criterion", "temperature"): dict(low=0.0, low_open=True),
    ("optimizer", "mix"): dict(low=0.0, high=1.0),
    ("optimizer", "mix_max"): dict(low=0.0, high=1.0),
    ("optimizer", "average"): dict(low=0.0, high=1.0),
    ("optimizer", "max_grad_norm"): dict(low=0.0, low_open=True),
}


class _CapturedStep:
    """One training step captured in a CUDA graph, with its static inputs and outputs."""

    def __init__(self, mgit: FusedMGiT, x: Tensor, y: Tensor, signature, hyperparameters):
        self.signature = signature
        self.x, self.y = x.clone(), y.clone()
        # learning rates and hyperparameters: device tensors that exist before the capture and
        # are refreshed before each replay
        mgit.optimizer.lr_tensors()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            stats = mgit._step(self.x, self.y, hyperparameters)
            self.values = torch.stack([stats[k].float() for k in STAT_KEYS])
            self.skipped = stats["skipped"]
        self.label_check = mgit.criterion.__dict__.pop("captured_check", None)

    def replay(self, mgit: FusedMGiT, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
        mgit.criterion._raise_for_finished_check()
        self.x.copy_(x)
        self.y.copy_(y)
        mgit.optimizer.lr_tensors()
        self.graph.replay()
        if self.label_check is not None:
            mgit.criterion.start_check(*self.label_check)
        values = self.values.clone()  # the next replay overwrites the static outputs
        stats = dict(zip(STAT_KEYS, values.unbind(0)))
        stats["skipped"] = self.skipped.clone()
        return stats
