"""MultiGradientAdamW: the MGiT update of a primary and an auxiliary model in one call."""
from __future__ import annotations

import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import _checks, functional
from .reference import MultiGradientStepOutput

Pairing = Union[str, Sequence[str]]
Hyper = Union[float, Tensor]
HYPERPARAMETERS = ("mix", "mix_max", "average", "max_grad_norm")  # each a float or a 0-dim device tensor
PAIRINGS = ("head", "all", "none")
HEAD_PREFIXES = ("head.", "classifier.")  # where timm / mgit_fast and transformers keep the classifier


def decays(name: str, param: Tensor, no_weight_decay: set) -> bool:
    """The ViT weight-decay rule: parameters with ≥ 2 dims, except the model's exclusions."""
    return param.dim() >= 2 and name not in no_weight_decay


def _decay_flags(model: Optional[nn.Module], named: Sequence[Tuple[str, Tensor]]) -> List[bool]:
    """The weight-decay rule per parameter; besides the model's ``no_weight_decay()``, the
    attention-mask parameters (``GaussianMixtureBias``, ``IBiTMask``) never decay, also in a
    model that does not list them (a timm ViT given IBiT masks by ``patch_vit``)."""
    from .attention import GaussianMixtureBias, IBiTMask

    excluded = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if model is not None:
        excluded.update(
            f"{module_name}.{name}".lstrip(".")
            for module_name, module in model.named_modules()
            if isinstance(module, (GaussianMixtureBias, IBiTMask))
            for name, _ in module.named_parameters()
        )
    return [decays(name, p, excluded) for name, p in named]


def pair_parameters(
    named_primary: Sequence[Tuple[str, Tensor]],
    named_auxiliary: Sequence[Tuple[str, Tensor]],
    pairing: Pairing,
) -> List[Tuple[int, int]]:
    """Index pairs ``(i, j)`` of primary and auxiliary parameters with the same name and shape.

    ``"head"`` pairs the classifier (names under ``head.``, timm's and mgit_fast's, or
    ``classifier.``, transformers'), ``"all"`` every match, ``"none"``
    nothing; a list of names pairs exactly those (each must exist in both with one shape).
    """
    auxiliary_index = {name: j for j, (name, _) in enumerate(named_auxiliary)}

    def match(i: int, name: str, param: Tensor) -> Optional[Tuple[int, int]]:
        j = auxiliary_index.get(name)
        if j is not None and named_auxiliary[j][1].shape == param.shape:
            return i, j
        return None

    if isinstance(pairing, str):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS} or a list of names, got {pairing!r}")
        if pairing == "none":
            return []
        chosen = [
            (i, name, p)
            for i, (name, p) in enumerate(named_primary)
            if pairing == "all" or name.startswith(HEAD_PREFIXES)
        ]
        pairs = [pair for pair in (match(*c) for c in chosen) if pair is not None]
        if not pairs and named_auxiliary:
            raise ValueError(
                f"pairing={pairing!r} found no parameter with the same name and shape in both models"
            )
        return pairs
    names = list(pairing)
    if not all(isinstance(n, str) for n in names):
        raise TypeError("pairing must be 'head', 'all', 'none' or a list of parameter names")
    primary_index = {name: i for i, (name, _) in enumerate(named_primary)}
    pairs = []
    for name in names:
        i = primary_index.get(name)
        pair = None if i is None else match(i, name, named_primary[i][1])
        if pair is None:
            raise ValueError(f"pairing names {name!r}, which is not a parameter of one shape in both models")
        pairs.append(pair)
    return pairs


class MultiGradientAdamW(torch.optim.Optimizer):
    """AdamW over a primary and an auxiliary model, with MGiT's gradient mixing.

    Each step: optional clipping of each model by its own global gradient norm
    (``max_grad_norm``); the mixing weight μ (``mix="adaptive"``:
    ``mix_max·ce_primary/(ce_primary + ce_auxiliary)``, or a fixed float); paired primary
    parameters (``pairing``) use ``(1 − μ)·g_P + μ·g_A``; AdamW on both models, exactly
    ``torch.optim.AdamW(amsgrad=False)``, with weight decay on parameters of ≥ 2 dims except
    the model's ``no_weight_decay()``; then, with ``average=γ > 0``, paired primary weights
    become ``(1 − γ)·θ_P + γ·θ_A``. A non-finite gradient anywhere skips the whole step
    (``skipped_steps`` grows). μ, the step count and the skip decision stay on the device.

    ``max_grad_norm``, ``mix`` (fixed), ``mix_max`` and ``average`` may be 0-dim float device
    tensors instead of floats: the update reads them at run time, so changing them in place
    (a schedule) needs no rebuild and works inside a captured CUDA graph (their values are then
    not range-checked). Clipping is on unless ``max_grad_norm`` is None; a tensor ``average``
    turns averaging on.

    ``auxiliary=None`` gives plain AdamW on the primary with the same rule (a baseline).
    Two parameter groups, ``primary`` and ``auxiliary``, hold ``lr`` and ``weight_decay``,
    so ``torch.optim.lr_scheduler`` schedules work. ``state_dict()`` is keyed by parameter name.
    """

    def __init__(
        self,
        primary: nn.Module,
        auxiliary: Optional[nn.Module] = None,
        *,
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.05,
        pairing: Pairing = "head",
        mix: Union[str, Hyper] = "adaptive",
        mix_max: Hyper = 0.5,
        average: Hyper = 0.0,
        max_grad_norm: Optional[Hyper] = None,
        backend: Optional[str] = None,
    ):
        if not isinstance(primary, nn.Module):
            raise TypeError(f"primary must be an nn.Module, got {type(primary).__name__}")
        if auxiliary is not None and not isinstance(auxiliary, nn.Module):
            raise TypeError(f"auxiliary must be an nn.Module or None, got {type(auxiliary).__name__}")
        if not isinstance(lr, Tensor):
            _checks.number("lr", lr, low=0.0)
        self.betas, self.eps = _hyperparameters(betas, eps)
        _checks.number("weight_decay", weight_decay, low=0.0)
        self.mix, self.mix_max, self.average, self.max_grad_norm = _mixing(mix, mix_max, average, max_grad_norm)
        if backend is not None and backend not in functional.BACKENDS:
            raise ValueError(f"backend must be one of {functional.BACKENDS} or None, got {backend!r}")
        self.backend = backend

        self.named_primary = _trainable("primary", primary)
        self.named_auxiliary = _trainable("auxiliary", auxiliary) if auxiliary is not None else []
        self.pairing = pairing
        self.pairs = pair_parameters(self.named_primary, self.named_auxiliary, pairing)
        self.decay_primary = _decay_flags(primary, self.named_primary)
        self.decay_auxiliary = _decay_flags(auxiliary, self.named_auxiliary)

        groups = [{"params": [p for _, p in self.named_primary], "name": "primary"}]
        if self.named_auxiliary:
            groups.append({"params": [p for _, p in self.named_auxiliary], "name": "auxiliary"})
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})

        device = self.named_primary[0][1].device
        self._check_hyperparameter_devices(device)
        self.use_kernel = functional.resolve_backend(backend, device.type) == "triton"
        if self.use_kernel:
            for name, p in self.named_primary + self.named_auxiliary:
                if p.dtype != torch.float32:
                    raise TypeError(f"parameter {name!r} must be float32 for backend='triton', got {p.dtype}")
                _checks.kernel_inputs(f"parameter {name!r}", p)
        self._flat = None  # the Triton backend's FlatLayout, built at the first step
        self._param_views = None
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.last_mix = torch.zeros((), dtype=torch.float32, device=device)
        for _, p in self.named_primary + self.named_auxiliary:
            self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        ce_primary: Optional[Union[Tensor, float]] = None,
        ce_auxiliary: Optional[Union[Tensor, float]] = None,
        grad_scale: Optional[Tensor] = None,
        closure: Optional[Callable[[], Any]] = None,
    ) -> MultiGradientStepOutput:
        """One update of both models. ``ce_primary``/``ce_auxiliary`` (0-dim tensors, e.g. the
        outputs of ``MGiTLoss``) are needed for ``mix="adaptive"``. ``grad_scale``: a 0-dim
        device tensor S when the gradients come from a loss multiplied by S (fp16 loss
        scaling); they are divided by S (an overflow is non-finite, so it skips the step).
        ``closure`` (torch.optim's convention, which trainers such as Lightning use to run their
        hooks): called first, with gradients enabled; its result is not used.
        Returns μ, the two gradient norms (unscaled) and the skip flag, all device tensors;
        nothing synchronises."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        self._check_hyperparameter_devices(self.step_count.device)
        mix = self.mix if self.named_auxiliary else 0.0
        if isinstance(mix, str):
            if ce_primary is None or ce_auxiliary is None:
                raise ValueError("mix='adaptive' needs ce_primary and ce_auxiliary passed to step()")
            ce_primary = _loss_tensor("ce_primary", ce_primary, self.step_count.device)
            ce_auxiliary = _loss_tensor("ce_auxiliary", ce_auxiliary, self.step_count.device)
        if grad_scale is not None:
            grad_scale = _loss_tensor("grad_scale", grad_scale, self.step_count.device)
        primary_group = self.param_groups[0]
        auxiliary_group = self.param_groups[1] if self.named_auxiliary else primary_group
        options = dict(
            step=self.step_count,
            skipped_steps=self.skipped_steps,
            betas=self.betas,
            eps=self.eps,
            weight_decay=(primary_group["weight_decay"], auxiliary_group["weight_decay"]),
            mix=mix,
            mix_max=self.mix_max,
            ce_primary=ce_primary,
            ce_auxiliary=ce_auxiliary,
            average=self.average if self.named_auxiliary else 0.0,
            max_grad_norm=self.max_grad_norm,
            grad_scale=grad_scale,
        )
        if self.use_kernel:
            grads = self._bind()
            lr = self.lr_tensors()
            out, skipped = self._flat.step(last_mix=self.last_mix, lr=lr, grads=grads, **options)
            return MultiGradientStepOutput(out[0], out[1], out[2], skipped)

        def tensors(named):
            params = [p for _, p in named]
            return (
                params,
                [p.grad for p in params],
                [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params],
            )

        out = functional.multi_gradient_adamw(
            *tensors(self.named_primary),
            *tensors(self.named_auxiliary),
            pairs=self.pairs,
            decay_primary=self.decay_primary,
            decay_auxiliary=self.decay_auxiliary,
            lr=(primary_group["lr"], auxiliary_group["lr"]),
            backend="torch",
            **options,
        )
        self.last_mix.copy_(out.mix)
        return out

    def _check_hyperparameter_devices(self, device: torch.device) -> None:
        for name in HYPERPARAMETERS:
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.device != device:
                raise ValueError(f"{name} is on {value.device} but the parameters are on {device}")

    # ---------------------------------------------------------------- the Triton backend
    # Parameters and moments of both models live in three flat buffers (the kernel's FlatLayout)
    # and the tensors the models and this optimizer hold are views into them; a parameter moved
    # or replaced is noticed at the next step and copied back in. Gradients stay where autograd,
    # DDP or a user put them (zero_grad sets them to None, so a backward writes fresh ones and
    # accumulates nothing): the kernels read them through a table of their addresses, uploaded
    # when one changes. A None gradient counts as zero here, whereas the torch backend leaves
    # that parameter alone.
    def _named(self):
        return self.named_primary + self.named_auxiliary

    def _build_flat(self) -> None:
        from .kernels.multi_gradient_adamw import FlatLayout

        named = self._named()
        layout = FlatLayout(
            [p.shape for _, p in self.named_primary],
            [p.shape for _, p in self.named_auxiliary],
            self.pairs,
            self.decay_primary,
            self.decay_auxiliary,
            named[0][1].device,
        )
        for index, (_, p) in enumerate(named):
            for buffer, key in ((layout.exp_avgs, "exp_avg"), (layout.exp_avg_sqs, "exp_avg_sq")):
                view = layout.view(buffer, index)
                view.copy_(self.state[p][key])
                self.state[p][key] = view
        self._flat = layout
        self._param_views = [layout.view(layout.params, i) for i in range(len(named))]
        for (_, p), view in zip(named, self._param_views):
            view.copy_(p.detach())
            p.data = view

    def _bind(self) -> List[Optional[Tensor]]:
        """Parameters back into the flat buffer if moved; the gradients the kernels read (fp32,
        contiguous, on the device; a copy only where a .grad is not)."""
        named = self._named()
        if self._flat is None or named[0][1].device != self._flat.device:
            self._build_flat()
        device = self._flat.device
        grads = []
        for (name, p), param_view in zip(named, self._param_views):
            if p.data_ptr() != param_view.data_ptr():
                param_view.copy_(p.detach())
                p.data = param_view
            grad = p.grad
            if grad is not None:
                if grad.shape != p.shape:
                    raise ValueError(f"the gradient of {name!r} has shape {tuple(grad.shape)}, not {tuple(p.shape)}")
                if grad.dtype != torch.float32 or grad.device != device or not grad.is_contiguous():
                    grad = grad.detach().to(device=device, dtype=torch.float32).contiguous()
            grads.append(grad)
        return grads

    def lr_tensors(self) -> Tuple[Tensor, Tensor]:
        """The learning rates the Triton update reads, as 0-dim device tensors, refreshed in
        place from ``param_groups`` (so a CUDA graph that captured them sees a scheduler's
        changes; a group ``lr`` given as a tensor is used as it is)."""
        groups = self.param_groups
        pair = []
        for index, group in enumerate((groups[0], groups[-1])):
            lr = group["lr"]
            if isinstance(lr, Tensor):
                pair.append(lr)
                continue
            slot = ("_lr_primary", "_lr_auxiliary")[index]
            cached = getattr(self, slot, None)
            if cached is None or cached.device != self.step_count.device:
                cached = torch.full((), float(lr), device=self.step_count.device)
                setattr(self, slot, cached)
            elif getattr(self, slot + "_value") != lr:
                cached.fill_(float(lr))
            setattr(self, slot + "_value", lr)
            pair.append(cached)
        return pair[0], pair[1]

    def __getstate__(self) -> Dict[str, Any]:
        """For copy.deepcopy and torch.save: all attributes (torch's Optimizer keeps only a
        subset), moments as compact tensors; the flat layout is rebuilt at the next step.
        Functions set on the instance are left out: an LR scheduler wraps ``step`` there with a
        reference to this optimizer, so a copy keeping it would step the original."""
        state = {k: v for k, v in self.__dict__.items() if not isinstance(v, (types.FunctionType, types.MethodType))}
        state["state"] = {p: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()}
        state.update(_flat=None, _param_views=None)
        return state

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Moments keyed by parameter name, counters, hyperparameters; backend-independent."""

        def moments(named):
            return {
                name: {key: self.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq")}
                for name, p in named
            }

        return {
            "state": {"primary": moments(self.named_primary), "auxiliary": moments(self.named_auxiliary)},
            "step": self.step_count.clone(),
            "skipped_steps": self.skipped_steps.clone(),
            "last_mix": self.last_mix.clone(),
            "param_groups": [
                {k: v for k, v in group.items() if k != "params"} for group in self.param_groups
            ],
            "config": {
                "betas": self.betas,
                "eps": self.eps,
                **{name: _copied(getattr(self, name)) for name in HYPERPARAMETERS},
                "pairs": [(self.named_primary[i][0], self.named_auxiliary[j][0]) for i, j in self.pairs],
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a ``state_dict()``; everything is checked before anything is written."""
        if not isinstance(state_dict, dict) or not {"state", "step", "param_groups", "config"} <= state_dict.keys():
            raise ValueError("state_dict is not a MultiGradientAdamW state_dict")
        config = state_dict["config"]
        pairs = [(self.named_primary[i][0], self.named_auxiliary[j][0]) for i, j in self.pairs]
        if [tuple(p) for p in config["pairs"]] != pairs:
            raise ValueError("state_dict pairs different parameters than this optimizer's pairing")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("state_dict has a different number of parameter groups (models)")
        copies = []
        for model, named in (("primary", self.named_primary), ("auxiliary", self.named_auxiliary)):
            saved = state_dict["state"].get(model, {})
            if set(saved) != {name for name, _ in named}:
                raise ValueError(f"state_dict's {model} parameters differ from this optimizer's")
            for name, p in named:
                for key in ("exp_avg", "exp_avg_sq"):
                    value = saved[name][key]
                    if not isinstance(value, Tensor) or value.shape != p.shape:
                        raise ValueError(f"state_dict's {model} {key} for {name!r} has the wrong shape")
                    copies.append((self.state[p][key], value))
        betas, eps = _hyperparameters(config["betas"], config["eps"])
        mixing = _mixing(config["mix"], config["mix_max"], config["average"], config["max_grad_norm"])

        for target, value in copies:
            target.copy_(value)
        for counter, key in ((self.step_count, "step"), (self.skipped_steps, "skipped_steps"), (self.last_mix, "last_mix")):
            counter.copy_(state_dict[key])
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.betas, self.eps = betas, eps
        for name, value in zip(HYPERPARAMETERS, mixing):
            current = getattr(self, name)
            if isinstance(current, Tensor) and not isinstance(value, (str, type(None))):
                current.copy_(value)  # the tensor a captured graph reads stays the same
            else:
                setattr(self, name, value)


def _copied(value):
    return value.detach().clone() if isinstance(value, Tensor) else value


def _trainable(name: str, model: nn.Module) -> List[Tuple[str, Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{name} has no trainable parameters")
    for n, p in named:
        if not p.is_floating_point():
            raise TypeError(f"{name} parameter {n!r} must be floating point, got {p.dtype}")
        if p.device != named[0][1].device:
            raise ValueError(f"{name} parameter {n!r} is on {p.device}, not {named[0][1].device}")
    return named


def _hyperparameters(betas, eps) -> Tuple[Tuple[float, float], float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    beta1 = _checks.number("betas[0]", betas[0], low=0.0)
    beta2 = _checks.number("betas[1]", betas[1], low=0.0)
    if beta1 >= 1.0 or beta2 >= 1.0:
        raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
    return (beta1, beta2), _checks.number("eps", eps, low=0.0)


def _hyperparameter(name: str, value, **bounds):
    """A float checked against ``bounds``, or a 0-dim floating-point tensor (read at run time)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {value.dtype}")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
        return value
    return _checks.number(name, value, **bounds)


def _mixing(mix, mix_max, average, max_grad_norm):
    if isinstance(mix, str):
        if mix != "adaptive":
            raise ValueError(f"mix must be 'adaptive' or a float in [0, 1], got {mix!r}")
    else:
        mix = _hyperparameter("mix", mix, low=0.0, high=1.0)
    mix_max = _hyperparameter("mix_max", mix_max, low=0.0, high=1.0)
    average = _hyperparameter("average", average, low=0.0, high=1.0)
    if max_grad_norm is not None:
        max_grad_norm = _hyperparameter("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
    return mix, mix_max, average, max_grad_norm


def _loss_tensor(name: str, value, device: torch.device) -> Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), device=device)
    _checks.tensor(name, value)
    if value.numel() != 1:
        raise ValueError(f"{name} must hold a single value, got shape {tuple(value.shape)}")
    if value.device != device:  # compared directly: no allocation on the step's hot path
        raise ValueError(f"{name} is on {value.device} but the parameters are on {device}")
    return value.reshape(())
