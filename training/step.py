"""The tokenizer's training step, in one place, with every speed/memory optimisation switchable.

``TokenizerTrainer`` holds the tokenizer, the frozen teacher and perceptual network, the
discriminator, both optimizers and the loss weights, and runs one full step: the generator
update (every loss, GAN included once active) and then the discriminator update. Both the
training script (``training/train_tokenizer.py``) and the benchmark
(``training/bench_train_step.py``) use it, so what is measured is what trains.

The switches (``Optimizations``) change speed and memory, never the objective: each one gives
the same losses as the plain step on a fixed batch up to float rounding (bf16 rounding for
``frozen_nets_bf16`` on CUDA), which ``tests/test_train_step.py`` and the benchmark check.

``Optimizations.none()`` is the plain step (the published recipe's way of doing things);
``Optimizations()`` (the defaults) turns on the switches that cost nothing and change no
number beyond rounding; ``Optimizations.all()`` adds channels-last, activation checkpointing
and ``torch.compile``, whose value depends on the GPU and must be measured there.
"""
from __future__ import annotations

import contextlib
import hashlib
import types
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from evotok.losses import LossWeights, generator_loss, hinge_discriminator_loss

COMPILE_TARGETS = ("encoder", "pixel_decoder", "semantic_decoder", "discriminator", "perceptual", "teacher")
"""Submodules ``Optimizations.compile`` may name (the quantizer is never compiled: its EMA update
mutates buffers in place and issues collectives)."""
DEFAULT_COMPILE = ("encoder", "discriminator", "perceptual", "teacher")
"""What ``compile: true`` means. Left out: the semantic decoder (three small layers, not worth the
compile time) and the pixel decoder: with torch 2.13's inductor on CPU, compiling diffusers'
``Decoder`` (whole, or block by block, with its mid-block attention) gave *wrong gradients* (zero
gradient into its input, so the encoder stopped learning from pixels) for some shapes, while
every other target matched the eager step. Name ``pixel_decoder`` explicitly only after
``training/bench_train_step.py`` shows matching step-2 losses on your GPU."""
CHECKPOINT_TARGETS = ("encoder", "pixel_decoder")
"""Submodules ``Optimizations.activation_checkpointing`` may name: the two deep networks whose
activations dominate memory (the encoder's transformer layers, the decoder's up blocks)."""


@dataclass(frozen=True)
class Optimizations:
    """Switches of the training step; each keeps the losses equal up to rounding.

    fused_quantizer: nearest-code search through ``evotok.nearest`` (fused Triton kernel on CUDA,
        cache-tiled on CPU). Off: the textbook search that materialises the N×K distance matrix
        (what the published quantizer does), for comparison only.
    fused_adam: ``torch.optim.Adam(fused=True)``; falls back to the foreach implementation, with
        a warning, where the fused kernel is not available.
    frozen_nets_bf16: the teacher runs under ``torch.inference_mode``; on CUDA the teacher and
        the perceptual network also hold bf16 weights and run under bf16 autocast (no per-step
        weight casts, half the weight memory). On CPU only inference mode applies.
    sync_free: ``step`` returns the loss terms as device tensors instead of Python floats (no
        ``.item()`` per step; convert only when logging), and inputs are copied to the device
        without blocking the host.
    lean_gan: in the generator update the discriminator's weights take no gradient (they would
        be discarded anyway) and bypass DDP; the discriminator update scores real and fake
        images in one batched forward (exact: its GroupNorm is per sample).
    cudnn_benchmark: let cuDNN time its convolution algorithms once per shape (CUDA only; this
        is a process-wide setting).
    channels_last: the pixel decoder, discriminator and perceptual network keep NHWC weights
        (tensor-core friendly convolutions on CUDA).
    activation_checkpointing: names from ``CHECKPOINT_TARGETS`` (``True`` = both) whose blocks
        recompute their activations in the backward pass: less memory, one more forward.
    compile: names from ``COMPILE_TARGETS`` (``True`` = ``DEFAULT_COMPILE``) compiled in place
        with ``nn.Module.compile`` (checkpoint keys unchanged); ``compile_mode`` is passed on.
    """

    fused_quantizer: bool = True
    fused_adam: bool = True
    frozen_nets_bf16: bool = True
    sync_free: bool = True
    lean_gan: bool = True
    cudnn_benchmark: bool = True
    channels_last: bool = False
    activation_checkpointing: tuple[str, ...] = ()
    compile: tuple[str, ...] = ()
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation_checkpointing",
                           _targets("activation_checkpointing", self.activation_checkpointing,
                                    CHECKPOINT_TARGETS, CHECKPOINT_TARGETS))
        object.__setattr__(self, "compile", _targets("compile", self.compile, COMPILE_TARGETS, DEFAULT_COMPILE))

    @classmethod
    def none(cls) -> "Optimizations":
        """The plain step: every switch off."""
        return cls(fused_quantizer=False, fused_adam=False, frozen_nets_bf16=False, sync_free=False,
                   lean_gan=False, cudnn_benchmark=False)

    @classmethod
    def all(cls) -> "Optimizations":
        """Every switch on (activation checkpointing on both targets, the default compile set)."""
        return cls(channels_last=True, activation_checkpointing=True, compile=True)

    @classmethod
    def switch_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "compile_mode")

    @classmethod
    def only(cls, name: str) -> "Optimizations":
        """The plain step with one switch on (list switches take their ``True`` meaning)."""
        if name not in cls.switch_names():
            raise ValueError(f"unknown optimisation {name!r}; choose from {', '.join(cls.switch_names())}")
        return replace(cls.none(), **{name: True})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "Optimizations":
        """From a config's ``train.optimizations`` mapping; keys left out keep their defaults."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train.optimizations key(s) {unknown}; known: {sorted(known)}")
        for key, value in values.items():
            if key not in ("activation_checkpointing", "compile", "compile_mode") and not isinstance(value, bool):
                raise ValueError(f"train.optimizations.{key} must be true or false, got {value!r}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["activation_checkpointing"] = list(self.activation_checkpointing)
        data["compile"] = list(self.compile)
        return data

    def describe(self) -> str:
        """A short label: the switches that differ from ``none()``."""
        base = Optimizations.none()
        on = []
        for name in self.switch_names():
            value = getattr(self, name)
            if value != getattr(base, name):
                on.append(name if isinstance(value, bool) else f"{name}({'+'.join(value)})")
        return ", ".join(on) or "none"


def _targets(field_name: str, value: Any, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    if value is True:
        return default
    if value is False or value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    bad = [v for v in value if v not in allowed]
    if bad:
        raise ValueError(f"{field_name}: unknown target(s) {bad}; choose from {list(allowed)} or true/false")
    return value


class _BF16Autocast(nn.Module):
    """Runs a frozen network under bf16 autocast, so fp32 inputs meet its bf16 weights."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.net(*args, **kwargs)


def _materialised_search(self: nn.Module, r: Tensor, codebook: Tensor, norms: Tensor) -> Tensor:
    """The textbook nearest-code search: the full N×K squared-distance matrix, then argmin."""
    distances = r.pow(2).sum(1, keepdim=True) + norms.unsqueeze(0) - 2.0 * (r @ codebook.t())
    return distances.argmin(dim=1)


def _checkpoint_fn(function: Callable, *args: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False)


def enable_activation_checkpointing(module: nn.Module) -> int:
    """Turn on the block-level checkpointing that transformers and diffusers modules carry.

    Both libraries mark checkpointable modules with a ``gradient_checkpointing`` flag and call
    ``self._gradient_checkpointing_func(fn, *args)``; this sets both on every such submodule
    (non-reentrant ``torch.utils.checkpoint``, safe with DDP). Returns how many were switched.
    """
    count = 0
    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub._gradient_checkpointing_func = _checkpoint_fn
            sub.gradient_checkpointing = True
            count += 1
    if count == 0:
        raise ValueError(f"{type(module).__name__} has no module with a gradient_checkpointing flag "
                         "(transformers/diffusers blocks); cannot checkpoint it")
    return count


def _teacher_compile_target(teacher: nn.Module) -> list[nn.Module]:
    """The teacher's network proper: an HF vision tower, or a bundled teacher's blocks."""
    tower = getattr(teacher, "tower", None)
    if isinstance(tower, nn.Module):
        return [tower]
    blocks = getattr(teacher, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return []


def freeze_unused_parameters(model: nn.Module) -> list[str]:
    """Stop training the parameters no loss can reach, and return their names.

    An encoder read at its penultimate layer (the HF vision encoders) never uses its last layer,
    final norm or pooling head. Such parameters never get a gradient, which DDP rejects ("Expected
    to have finished reduction in the prior iteration ...") unless it searches the graph for
    unused parameters every step. One probe forward/backward on a blank image (eval mode: the
    codebooks are not touched) finds them once; they are frozen, their values stay in checkpoints.
    """
    was_training = model.training
    model.eval()
    size = model.config.image_size
    device = next(model.parameters()).device
    try:
        output = model(torch.zeros(1, 3, size, size, device=device))
        (output.reconstruction.float().sum() + output.semantic_features.float().sum()
         + output.commitment_loss.float()).backward()
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    return unused


class TokenizerTrainer:
    """One optimised training step of the EvoTok tokenizer.

    >>> trainer = TokenizerTrainer(tokenizer, weights=LossWeights(), lr=1e-4, teacher=teacher,
    ...                            discriminator=PatchDiscriminator(), device="cuda", mixed_precision="bf16")
    >>> trainer.prepare(accelerator)          # optional: DDP/FSDP wrapping, autocast and backward via accelerate
    >>> terms = trainer.step(images, pixel_depths, step)   # dict of loss terms (tensors when sync_free)

    Args:
        model: the ``EvoTok`` tokenizer (trained).
        weights: loss weights (``evotok.losses.LossWeights``); the GAN term and discriminator
            update start at ``weights.gan_start_step``.
        lr, betas: Adam settings of the tokenizer; ``disc_lr`` (default ``lr``) of the discriminator.
        grad_clip: clip the tokenizer's gradient norm to this (``None`` or 0: no clipping).
        teacher: frozen teacher (``image_features``), or ``None`` (no semantic loss).
        perceptual: ``evotok.losses.FeatureDistance`` or ``None``.
        discriminator: a ``PatchDiscriminator`` or ``None`` (no GAN term).
        optimizations: the switches (``Optimizations``).
        device: where everything runs (``prepare`` takes the accelerator's device instead).
        mixed_precision: ``"no"`` or ``"bf16"`` (CUDA only) when no accelerator is used.
    """

    def __init__(self, model: nn.Module, *, weights: LossWeights, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 grad_clip: float | None = None, teacher: nn.Module | None = None,
                 perceptual: nn.Module | None = None, discriminator: nn.Module | None = None,
                 disc_lr: float | None = None, optimizations: Optimizations | None = None,
                 device: str | torch.device = "cpu", mixed_precision: str = "no") -> None:
        self.opts = optimizations if optimizations is not None else Optimizations()
        self.device = torch.device(device)
        if mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16' without accelerate, got {mixed_precision!r} "
                             "(fp16 needs a gradient scaler: train through accelerate)")
        self.autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" and self.device.type == "cuda" else None
        self.weights = weights
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.model = model.to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        self.perceptual = perceptual.to(self.device) if perceptual is not None else None
        self.discriminator = discriminator.to(self.device) if discriminator is not None else None
        self.notes: list[str] = []  # what was applied or fell back, for logs and the benchmark
        self.frozen = freeze_unused_parameters(self.model)  # before compile: the probe must not trace
        if self.frozen:
            self.notes.append(f"{len(self.frozen)} parameters reach no loss and are frozen "
                              f"(e.g. {self.frozen[0]})")
        self._apply_layout()
        self.optimizer = self._adam([p for p in self.model.parameters() if p.requires_grad], lr, betas)
        self.disc_optimizer = (self._adam(list(self.discriminator.parameters()), disc_lr or lr, betas)
                               if self.discriminator is not None else None)
        # what the step calls; ``prepare`` swaps in the accelerator's wrapped modules
        self.module: nn.Module = self.model
        self.disc_module: nn.Module | None = self.discriminator
        self.accelerator = None

    # ------------------------------------------------------------------ set-up
    def _apply_layout(self) -> None:
        opts, cuda = self.opts, self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = opts.cudnn_benchmark
        if not opts.fused_quantizer:
            quantizer = self.model.quantizer
            if not callable(getattr(quantizer, "_search", None)):
                raise TypeError("fused_quantizer=False needs a quantizer with a _search(r, codebook, norms) method")
            quantizer._search = types.MethodType(_materialised_search, quantizer)
        if opts.frozen_nets_bf16 and cuda:
            if self.teacher is not None:
                from evotok.teacher import HFVisionTeacher

                if isinstance(self.teacher, HFVisionTeacher):  # casts its own inputs to its weights' dtype
                    self.teacher.model.to(torch.bfloat16)
            if self.perceptual is not None:
                self.perceptual.feature_net = _BF16Autocast(self.perceptual.feature_net.to(torch.bfloat16)).eval()
        if opts.channels_last:
            for net in (self.model.pixel_decoder, self.discriminator,
                        self.perceptual.feature_net if self.perceptual is not None else None):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        for name in opts.activation_checkpointing:
            target = self.model.encoder if name == "encoder" else self.model.pixel_decoder
            self.notes.append(f"activation checkpointing: {name} ({enable_activation_checkpointing(target)} modules)")
        for name in opts.compile:
            for net in self._compile_targets(name):
                net.compile(mode=opts.compile_mode)
            self.notes.append(f"compiled: {name}")

    def _compile_targets(self, name: str) -> list[nn.Module]:
        if name == "teacher":
            targets = _teacher_compile_target(self.teacher) if self.teacher is not None else []
        elif name == "perceptual":
            targets = [self.perceptual.feature_net] if self.perceptual is not None else []
        elif name == "discriminator":
            targets = [self.discriminator] if self.discriminator is not None else []
        else:
            targets = [getattr(self.model, name)]
        if not targets:
            self.notes.append(f"compile: nothing to compile for {name!r}")
        return targets

    def _adam(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        if self.opts.fused_adam:
            try:
                optimizer = torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)
                self.notes.append("fused Adam")
                return optimizer
            except (RuntimeError, ValueError) as err:  # a device or dtype without the fused kernel
                message = f"fused Adam is not available here ({err}); using the foreach implementation"
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                self.notes.append(message)
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas))

    @property
    def fused_adam_active(self) -> bool:
        return bool(self.optimizer.defaults.get("fused"))

    def prepare(self, accelerator: Any) -> None:
        """Wrap the trained modules and optimizers with ``accelerator.prepare`` (DDP, FSDP, ...);
        afterwards the step uses its autocast, backward and gradient clipping."""
        self.accelerator = accelerator
        self.device = accelerator.device
        self.autocast_dtype = None  # accelerator.autocast decides
        self.module, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        if self.discriminator is not None:
            self.disc_module, self.disc_optimizer = accelerator.prepare(self.discriminator, self.disc_optimizer)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizers and discriminator (unwrapped), as the training script saves them."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "optimizer_d": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``state_dict`` (call before ``prepare``); optimizer states are laid out like
        their parameters afterwards, so a checkpoint saved without channels-last resumes with it."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.discriminator is not None:
            if state.get("discriminator") is None:
                raise ValueError("the checkpoint has no discriminator state but this run trains one")
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["optimizer_d"])
        for optimizer in (self.optimizer, self.disc_optimizer):
            if optimizer is not None:
                _match_state_layout(optimizer)

    # ------------------------------------------------------------------ the step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.accelerator is not None:
            return self.accelerator.autocast()
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def _backward(self, loss: Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _clip(self) -> None:
        if self.grad_clip is None:
            return
        if self.accelerator is not None:
            self.accelerator.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)

    def _to_device(self, tensor: Tensor) -> Tensor:
        # only host tensors are pinned: a tensor already on a GPU ("cuda:0" never equals a bare "cuda") just moves
        if self.opts.sync_free and self.device.type == "cuda" and tensor.device.type == "cpu":
            if not tensor.is_pinned():
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def teacher_features(self, images: Tensor) -> Tensor | None:
        """The frozen teacher's patch features (the semantic target), as fp32 without gradient."""
        if self.teacher is None or self.weights.semantic <= 0:
            return None
        if not self.opts.frozen_nets_bf16:
            with torch.no_grad():
                return self.teacher.image_features(images)
        bf16 = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), bf16:
            features = self.teacher.image_features(images)
        # a normal tensor again: inference tensors cannot be saved for the loss's backward
        return features.float() if features.dtype != torch.float32 else features.clone()

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and self.weights.gan > 0 and step >= self.weights.gan_start_step

    def step(self, images: Tensor, pixel_depths: Tensor | int | None, step: int) -> dict[str, Tensor | float]:
        """One generator update and (once the GAN is active) one discriminator update.

        ``images``: ``b 3 H W`` in [-1, 1] (any device); ``pixel_depths``: per-sample decode
        depths (quantizer dropout) or ``None``; ``step``: the global step (GAN start).
        Returns the loss terms, ``"discriminator"`` included when it ran: 0-dim device tensors
        when ``sync_free``, else Python floats.
        """
        images = self._to_device(images)
        if isinstance(pixel_depths, Tensor):
            pixel_depths = self._to_device(pixel_depths)
        gan = self.gan_active(step)
        lean = self.opts.lean_gan and gan
        target = self.teacher_features(images)

        # generator update
        if lean:
            self.discriminator.requires_grad_(False)
        try:
            with self._autocast():
                output = self.module(images, pixel_depths)
                disc = (self.discriminator if lean else self.disc_module) if gan else None
                loss, terms = generator_loss(output, images, target, self.weights, step, disc, self.perceptual)
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
        finally:
            if lean:
                self.discriminator.requires_grad_(True)
        self._clip()
        self.optimizer.step()

        # discriminator update
        if gan:
            fake = output.reconstruction.detach()
            with self._autocast():
                if self.opts.lean_gan:
                    logits = self.disc_module(torch.cat([images, fake.to(images.dtype)]))
                    real_logits, fake_logits = logits.split(images.shape[0])
                else:
                    real_logits, fake_logits = self.disc_module(images), self.disc_module(fake)
                d_loss = hinge_discriminator_loss(real_logits, fake_logits)
            self.disc_optimizer.zero_grad(set_to_none=True)
            self._backward(d_loss)
            self.disc_optimizer.step()
            terms["discriminator"] = d_loss.detach()
        if self.opts.sync_free:
            return terms
        return {key: value.item() for key, value in terms.items()}


def _match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor its parameter's strides (fused kernels need it)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def state_digests(model: nn.Module) -> dict[str, str]:
    """SHA-256 of the quantizer's buffers and of all parameters: equal on every data-parallel
    rank when the ranks are in sync (the codebooks by the all-reduced EMA, the weights by DDP)."""

    def digest(tensors: Iterator[tuple[str, Tensor]]) -> str:
        h = hashlib.sha256()
        for name, tensor in tensors:
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    quantizer = getattr(model, "quantizer", None)
    buffers = quantizer.state_dict().items() if quantizer is not None else iter(())
    return {"quantizer_buffers": digest(iter(sorted(buffers))),
            "parameters": digest(iter(sorted(model.named_parameters())))}


def gather_digests(model: nn.Module, accelerator: Any) -> list[dict[str, str]]:
    """``state_digests`` of every rank, in rank order (one collective)."""
    mine = state_digests(model)
    if accelerator.num_processes == 1:
        return [mine]
    import torch.distributed as dist

    gathered: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, mine)
    return gathered


__all__ = ["COMPILE_TARGETS", "CHECKPOINT_TARGETS", "DEFAULT_COMPILE", "Optimizations", "TokenizerTrainer",
           "enable_activation_checkpointing", "freeze_unused_parameters", "gather_digests", "state_digests"]
