"""`train_lora`: the LoRA training loop as one function (nanoGPT's `train.py` body, without globals).

    result = train_lora(dit, items, TrainConfig(steps=2000, base_mode=BaseMode.BASE), on_step=print)
    result = train_lora(dit, items, cfg, resume=Path("out/my_lora_001000.state.safetensors"))

Per step: `grad_accumulation` micro-batches from `BucketBatches` → noise, σ and caption dropout drawn from a
CPU generator seeded by (seed, step) → flow-matching loss (optionally with differential guidance) → backward
→ clip → optimizer step. The learning rate is a pure function of the step (nanoGPT's `get_lr`), so the only
scheduler state is the step itself. Together with the optimizer tensors, the LoRA and the batch sampler's
(epoch, position), a resumed run follows the uninterrupted one bit for bit.

Everything that can be wrong with the inputs (config, items, adapter file, resume state) is checked before
the first step. The DiT comes back as it went in: requires_grad flags restored, the trained LoRA detached,
the training adapter un-merged (bit-exact). Files: `<output_dir>/<name>_<step:06d>.safetensors` (the LoRA,
ComfyUI format) and `<name>_<step:06d>.state.safetensors` (the resume state; safetensors only, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..lora import ApplyMode, LoraFile, apply_loras, read_lora
from ..safetensors_file import save_atomic
from ..sampling import velocity_target
from .config import BaseMode, LRSchedule, OptimizerKind, TrainConfig
from .data import BucketBatches, TrainItem, collate
from .lora_net import TrainableLora
from .loss import differential_guidance_target, flow_matching_loss, predicted_velocity
from .timesteps import loss_weights, sample_sigmas

STATE_FORMAT = "zimage-train-state-v1"
OnStep = Callable[[int, float, float], None]  # (steps done, loss, learning rate)


@dataclass
class TrainResult:
    lora: TrainableLora  # detached from the DiT; `attach()` it to sample with it
    losses: list[float] = field(default_factory=list)  # one per step, resumed steps included
    steps_done: int = 0
    last_checkpoint: Path | None = None  # the LoRA file of the last checkpoint written
    interrupted: bool = False


def train_lora(dit: nn.Module, items: Sequence[TrainItem], config: TrainConfig, *, on_step: OnStep | None = None,
               should_stop: Callable[[], bool] | None = None, resume: Path | None = None,
               empty_caption: torch.Tensor | None = None) -> TrainResult:
    """Train a LoRA on `items` (see the module docstring). `empty_caption`: features of "" (needed when
    `config.caption_dropout` > 0, see `data.empty_caption_features`)."""
    state = read_state(Path(resume), config) if resume is not None else None  # cheap checks first
    check_items(dit, items, config, empty_caption)
    if state is not None and state.meta.get("dataset") != dataset_id(items):
        raise ValueError(f"{resume} was written for other training items (keys/buckets differ); the batch order "
                         "would not continue")
    make_optimizer([nn.Parameter(torch.zeros(1))], config)  # a missing optional package fails here, not at step 1
    adapter = read_adapter(config) if config.base_mode is BaseMode.TURBO_ADAPTER else None
    if state is not None and int(state.meta["step"]) >= config.steps:
        raise ValueError(f"{resume}: the state is at step {state.meta['step']}, config.steps is {config.steps}; "
                         "raise steps to train further")
    flags = {name: p.requires_grad for name, p in dit.named_parameters()}
    applied, lora = None, None
    try:
        if adapter is not None:  # merged at 1.0 as AI Toolkit/musubi/DiffSynth do (ZIMAGE_SPEC §7.3)
            applied = apply_loras(dit, [(adapter, 1.0)], ApplyMode.MERGED)
        dit.requires_grad_(False)
        lora = TrainableLora(dit, config.rank, config.alpha, config.targets, config.seed)
        lora.attach()
        run = _Run(dit, lora, items, config, empty_caption, adapter)
        if state is not None:
            run.restore(state)
        return run.train(on_step, should_stop)
    finally:
        if lora is not None:
            lora.detach()
        if applied is not None:
            applied.remove()
        for name, p in dit.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))


# ---- checks before any work --------------------------------------------------------------------------

def check_items(dit: nn.Module, items: Sequence[TrainItem], config: TrainConfig,
                empty_caption: torch.Tensor | None) -> None:
    if not items:
        raise ValueError("train_lora: no training items")
    channels, cap_dim = dit.cfg.in_channels, dit.cfg.cap_feat_dim
    for item in items:
        lat, cap = item.latent, item.caption_features
        if lat.ndim != 3 or lat.shape[0] != channels or lat.shape[1] % 2 or lat.shape[2] % 2:
            raise ValueError(f"train item {item.key}: latent must be ({channels}, even h, even w), "
                             f"got {list(lat.shape)}")
        if cap.ndim != 2 or cap.shape[0] < 1 or cap.shape[1] != cap_dim:
            raise ValueError(f"train item {item.key}: caption features must be (L ≥ 1, {cap_dim}) for this DiT, "
                             f"got {list(cap.shape)}")
        if not (torch.isfinite(lat).all() and torch.isfinite(cap).all()):
            raise ValueError(f"train item {item.key}: NaN or Inf in its latent or caption features")
    if config.caption_dropout > 0:
        if empty_caption is None:
            raise ValueError("caption_dropout > 0 needs empty_caption (the features of \"\")")
        if empty_caption.ndim != 2 or empty_caption.shape[1] != cap_dim or empty_caption.shape[0] < 1:
            raise ValueError(f"empty_caption must be (L ≥ 1, {cap_dim}), got {list(empty_caption.shape)}")


def dataset_id(items: Sequence[TrainItem]) -> str:
    """What the batch sampler's order depends on: the items' keys and buckets, in order."""
    return hashlib.sha256(json.dumps([[i.key, list(i.bucket)] for i in items]).encode()).hexdigest()


def read_adapter(config: TrainConfig) -> LoraFile:
    """The training adapter, read and checked (another model's LoRA is an error here, not at step 1)."""
    path = config.adapter_path
    if path is None or not path.is_file():
        raise FileNotFoundError(f"training adapter {path} does not exist")
    try:
        return read_lora(path)
    except ValueError as e:
        raise ValueError(f"training adapter (adapter_path) is not usable: {e}") from None


# ---- one step ----------------------------------------------------------------------------------------

def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then constant / cosine / linear decay to 0."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if config.scheduler is LRSchedule.CONSTANT:
        return lr
    ratio = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    if config.scheduler is LRSchedule.COSINE:
        return lr * 0.5 * (1.0 + math.cos(math.pi * ratio))
    return lr * (1.0 - ratio)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step: a function of (seed, step) only, so a resumed step draws the same."""
    digest = hashlib.sha256(f"zimage-train:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def micro_batch_loss(dit: nn.Module, batch: Sequence[TrainItem], gen: torch.Generator, config: TrainConfig,
                     empty_caption: torch.Tensor | None) -> torch.Tensor:
    x0, caps = collate(batch)
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    sigmas = sample_sigmas(n, config.timestep_sampling, gen, shift=config.shift, bias=config.noise_bias,
                           sigmoid_scale=config.sigmoid_scale)
    if config.caption_dropout > 0:
        drop = (torch.rand(n, generator=gen) < config.caption_dropout).tolist()
        caps = [empty_caption if d else c for c, d in zip(caps, drop, strict=True)]
    device = next(dit.parameters()).device
    x0, noise, sigmas = x0.to(device), noise.to(device), sigmas.to(device)
    caps = [c.to(device) for c in caps]
    weights = loss_weights(sigmas, config.timestep_sampling)
    if config.differential_guidance_scale <= 0:
        return flow_matching_loss(dit, x0, noise, sigmas, caps, weights)
    pred = predicted_velocity(dit, x0, noise, sigmas, caps).float()
    target = differential_guidance_target(pred, velocity_target(x0, noise).float(), config.differential_guidance_scale)
    per_item = (pred - target).square().flatten(1).mean(1)
    return (per_item * weights.to(per_item.device, torch.float32)).mean()


# ---- the run -----------------------------------------------------------------------------------------

class _Run:
    """The mutable parts of one run: LoRA, optimizer, batch sampler, step and losses."""

    def __init__(self, dit, lora: TrainableLora, items, config: TrainConfig, empty_caption, adapter) -> None:
        self.dit, self.lora, self.items, self.config = dit, lora, items, config
        self.empty_caption, self.adapter = empty_caption, adapter
        self.params = [p for _, p in sorted(lora.named_parameters())]
        self.opt = make_optimizer(self.params, config)
        self.batches = BucketBatches(items, config.batch_size, config.seed)
        self.step, self.losses = 0, []
        self.last_checkpoint: Path | None = None

    def train(self, on_step: OnStep | None, should_stop: Callable[[], bool] | None) -> TrainResult:
        cfg = self.config
        interrupted = False
        while self.step < cfg.steps:
            lr = lr_at(self.step, cfg)
            loss = self.train_step(lr)
            self.step += 1
            self.losses.append(loss)
            if on_step is not None:
                on_step(self.step, loss, lr)
            if should_stop is not None and should_stop():
                interrupted = True
                break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
        self.save()
        return TrainResult(self.lora, list(self.losses), self.step, self.last_checkpoint, interrupted)

    def train_step(self, lr: float) -> float:
        cfg = self.config
        for group in self.opt.param_groups:
            group["lr"] = lr
        gen = step_generator(cfg.seed, self.step)
        total = 0.0
        for _ in range(cfg.grad_accumulation):
            loss = micro_batch_loss(self.dit, self.batches.next_batch(), gen, cfg, self.empty_caption)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {self.step + 1}: the loss is {loss.item()}; lower the learning rate")
            (loss / cfg.grad_accumulation).backward()
            total += loss.item() / cfg.grad_accumulation
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    # ---- checkpoints ----

    def save(self) -> Path:
        cfg, stem = self.config, f"{self.config.name}_{self.step:06d}"
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.lora.save(cfg.output_dir / f"{stem}.safetensors", self.lora_metadata())
        save_atomic(cfg.output_dir / f"{stem}.state.safetensors", *self.state_tensors())
        self.last_checkpoint = Path(path)
        prune_checkpoints(cfg.output_dir, cfg.name, cfg.keep_last)
        return self.last_checkpoint

    def lora_metadata(self) -> dict[str, str]:
        cfg = self.config
        return {"zimage_train.base_mode": cfg.base_mode.value,
                "zimage_train.adapter": cfg.adapter_path.name if cfg.adapter_path else "",
                "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha),
                "ss_steps": str(self.step), "ss_learning_rate": str(cfg.learning_rate),
                "zimage_train.trigger": cfg.trigger, "ss_num_train_images": str(len(self.items)),
                "zimage_train.buckets": json.dumps(sorted({tuple(i.bucket) for i in self.items})),
                "zimage_train.config": json.dumps(cfg.to_dict(), sort_keys=True)}

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"lora.{name}": p.detach().cpu().contiguous() for name, p in self.lora.named_parameters()}
        opt_state = self.opt.state_dict()
        scalars: dict[str, dict] = {}
        for idx, entry in opt_state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        epoch, position = self.batches.state()
        meta = {"format": STATE_FORMAT, "step": str(self.step), "epoch": str(epoch), "position": str(position),
                "fingerprint": self.config.fingerprint(), "dataset": dataset_id(self.items),
                "config": json.dumps(self.config.fingerprint_fields(), sort_keys=True),
                "optim_groups": json.dumps(opt_state["param_groups"]), "optim_scalars": json.dumps(scalars),
                "losses": json.dumps(self.losses)}
        return tensors, meta

    def restore(self, state: _State) -> None:
        tensors, meta = state.tensors(), state.meta
        own = dict(self.lora.named_parameters())
        stored = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
        if set(stored) != set(own) or any(stored[k].shape != own[k].shape for k in own):
            raise ValueError(f"{state.path}: its LoRA parameters do not match this run's (rank/targets/model)")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(stored[k])
        self.opt.load_state_dict(_optimizer_state(tensors, meta))
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        self.batches.load_state((int(meta["epoch"]), int(meta["position"])))
        self.step, self.losses = int(meta["step"]), [float(x) for x in json.loads(meta["losses"])]


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entries in json.loads(meta["optim_scalars"]).items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": json.loads(meta["optim_groups"])}


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer is OptimizerKind.ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer is OptimizerKind.ADAMW_8BIT:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optimizer ADAMW_8BIT needs bitsandbytes (pip install bitsandbytes); "
                              "or use ADAMW / ADAFACTOR") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False, warmup_init=False)


# ---- resume state and files --------------------------------------------------------------------------

@dataclass
class _State:
    path: Path
    meta: dict[str, str]

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.path)


def read_state(path: Path, config: TrainConfig) -> _State:
    """The resume state's header, checked against `config` (tensors are loaded later, only if it matches)."""
    if not path.is_file():
        raise FileNotFoundError(f"resume state {path} does not exist")
    try:
        with safe_open(path, "pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as e:
        raise ValueError(f"resume state {path} is not a safetensors file: {e}") from None
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state file ({STATE_FORMAT}); pass the .state.safetensors file")
    if meta.get("fingerprint") != config.fingerprint():
        theirs, ours = json.loads(meta.get("config", "{}")), config.fingerprint_fields()
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        shown = ", ".join(f"{k} ({theirs.get(k)!r} → {ours.get(k)!r})" for k in diff)
        raise ValueError(f"{path} was written by a different training config; differing: {shown or 'unknown'}")
    return _State(path, meta)


def prune_checkpoints(folder: Path, name: str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (LoRA + state) of run `name`; 0 keeps all."""
    if keep_last <= 0:
        return []
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{6}})\.safetensors$")
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name)))
    removed = []
    for step in steps[:-keep_last]:
        for suffix in (".safetensors", ".state.safetensors"):
            p = folder / f"{name}_{step:06d}{suffix}"
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed
