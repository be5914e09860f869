"""`train_lora`: the LoRA training loop as one function (nanoGPT's `train.py` body, without globals).

    result = train_lora(dit, items, TrainConfig(steps=2000, base_mode=BaseMode.BASE), on_step=print)
    result = train_lora(dit, items, cfg, resume=Path("out/my_lora_001000.state.safetensors"))

Per step: `grad_accumulation` micro-batches from `BucketBatches` → noise, σ and caption dropout drawn from a
CPU generator seeded by (seed, step) → flow-matching loss (optionally with differential guidance, plus the DOP
term `preservation_loss` with `dop_class`) → backward → clip → optimizer step (→ EMA update with `ema_decay`).
Previews (previews.py) run between steps, outside the training path. The learning rate is a pure function of
the step (nanoGPT's `get_lr`), so the only scheduler state is the step itself. Together with the optimizer
tensors, the LoRA (and its EMA) and the batch sampler's (epoch, position), a resumed run follows the
uninterrupted one bit for bit.

Everything that can be wrong with the inputs (config, items, adapter file, resume state) is checked before
the first step. The DiT comes back as it went in: requires_grad flags restored, the trained LoRA detached,
the training adapter un-merged (bit-exact). Files: `<output_dir>/<name>_<step:06d>.safetensors` (the LoRA,
ComfyUI format) and `<name>_<step:06d>.state.safetensors` (the resume state; safetensors only, no pickle).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..lora import ApplyMode, LoraFile, apply_loras, read_lora
from ..offload import BlockSwap
from ..safetensors_file import save_atomic
from ..sampling import velocity_target
from .config import BaseMode, LRSchedule, OptimizerKind, TrainConfig
from .data import BucketBatches, TrainItem, collate
from .distributed import SINGLE, World
from .ema import LoraEMA
from .lora_net import TrainableLora
from .loss import differential_guidance_target, flow_matching_loss, predicted_velocity
from .previews import OnPreview, PreviewRunner, Previews, check_previews
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
    previews: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, latents) CPU float32


def train_lora(dit: nn.Module, items: Sequence[TrainItem], config: TrainConfig, *, on_step: OnStep | None = None,
               should_stop: Callable[[], bool] | None = None, resume: Path | None = None,
               empty_caption: torch.Tensor | None = None, previews: Previews | None = None,
               on_preview: OnPreview | None = None) -> TrainResult:
    """Train a LoRA on `items` (see the module docstring). `empty_caption`: features of "" (needed when
    `config.caption_dropout` > 0, see `data.empty_caption_features`, and as the previews' default negative).
    `previews`: sample these captions every `previews.every` steps and at the end (previews.py); each preview
    goes to `on_preview(step, latents)` and into `TrainResult.previews`. With `config.ema_decay` the saved
    LoRAs, the previews and `TrainResult.lora` hold the EMA weights (ema.py)."""
    state = read_state(Path(resume), config) if resume is not None else None  # cheap checks first
    world = World.current()
    if state is not None and int(state.meta.get("world_size", "1")) != world.size:
        raise ValueError(f"{resume} was written by a run of {state.meta.get('world_size', '1')} process(es), this "
                         f"one has {world.size}: the global batch (batch_size × processes) would differ")
    check_items(dit, items, config, empty_caption)
    preview_setup = check_previews(dit, previews, config, empty_caption) if previews is not None else None
    if state is not None and state.meta.get("dataset") != dataset_id(items):
        raise ValueError(f"{resume} was written for other training items (keys/buckets differ); the batch order "
                         "would not continue")
    make_optimizer([nn.Parameter(torch.zeros(1))], config)  # a missing optional package fails here, not at step 1
    adapter = read_adapter(config) if config.base_mode is BaseMode.TURBO_ADAPTER else None
    if state is not None and int(state.meta["step"]) >= config.steps:
        raise ValueError(f"{resume}: the state is at step {state.meta['step']}, config.steps is {config.steps}; "
                         "raise steps to train further")
    flags = {name: p.requires_grad for name, p in dit.named_parameters()}
    applied, lora, swap, checkpointing = None, None, None, dit.gradient_checkpointing
    try:
        if adapter is not None:  # merged at 1.0 as AI Toolkit/musubi/DiffSynth do (ZIMAGE_SPEC §7.3)
            applied = apply_loras(dit, [(adapter, 1.0)], ApplyMode.MERGED)
        dit.requires_grad_(False)
        lora = TrainableLora(dit, config.rank, config.alpha, config.targets, config.seed)
        lora.attach()
        dit.gradient_checkpointing = config.gradient_checkpointing  # memory options: after the LoRA is placed
        swap = BlockSwap(dit, config.blocks_to_swap).install() if config.blocks_to_swap else None
        run = _Run(dit, lora, items, config, empty_caption, adapter, world)
        if preview_setup is not None:
            run.previewer, run.on_preview = PreviewRunner(dit, previews, *preview_setup, applied), on_preview
        if state is not None:
            run.restore(state)
        return run.train(on_step, should_stop)
    finally:
        if swap is not None:
            swap.remove()
        dit.gradient_checkpointing = checkpointing
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
    check_optimizer(config.optimizer)
    channels, cap_dim = dit.cfg.in_channels, dit.cfg.cap_feat_dim
    if config.blocks_to_swap > dit.cfg.n_layers - 1:
        raise ValueError(f"blocks_to_swap {config.blocks_to_swap}: this DiT has {dit.cfg.n_layers} layers, at most "
                         f"{dit.cfg.n_layers - 1} can be swapped (one stays on the device)")
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
    if config.dop_class:
        for item in items:
            kept = item.preservation_features
            if kept is None:
                raise ValueError(f"train item {item.key}: DOP (dop_class {config.dop_class!r}) needs its class "
                                 "caption's features (build_items(..., dop_class=..., trigger=...))")
            if kept.ndim != 2 or kept.shape[0] < 1 or kept.shape[1] != cap_dim or not torch.isfinite(kept).all():
                raise ValueError(f"train item {item.key}: preservation features must be finite (L ≥ 1, {cap_dim}), "
                                 f"got {list(kept.shape)}")


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
                     empty_caption: torch.Tensor | None, world: World = SINGLE,
                     lora: TrainableLora | None = None) -> torch.Tensor | None:
    """The loss of this rank's share of the global `batch`: the sum of its items' losses over len(batch), so
    that summing over ranks gives the batch mean (distributed.py). Noise, σ and dropout are drawn for the
    whole batch on every rank. None when this rank's share is empty."""
    x0, caps = collate(batch)
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    sigmas = sample_sigmas(n, config.timestep_sampling, gen, shift=config.shift, bias=config.noise_bias,
                           sigmoid_scale=config.sigmoid_scale)
    if config.caption_dropout > 0:
        drop = (torch.rand(n, generator=gen) < config.caption_dropout).tolist()
        caps = [empty_caption if d else c for c, d in zip(caps, drop, strict=True)]
    mine = world.share(n)
    if mine.start == mine.stop:
        return None
    x0, noise, sigmas, caps = x0[mine], noise[mine], sigmas[mine], caps[mine]
    loss = _share_loss(dit, x0, noise, sigmas, caps, config) + preservation_loss(dit, lora, batch[mine], x0, noise,
                                                                                 sigmas, config)
    return loss * ((mine.stop - mine.start) / n)


def preservation_loss(dit: nn.Module, lora: TrainableLora | None, batch: Sequence[TrainItem], x0: torch.Tensor,
                      noise: torch.Tensor, sigmas: torch.Tensor, config: TrainConfig) -> torch.Tensor | float:
    """AI Toolkit's differential output preservation (ZIMAGE_SPEC §7.4), 0 when `dop_class` is off:
    dop_multiplier · MSE(v with the LoRA, v without it) on the items' class captions at the same x_σ and σ.
    The LoRA-off prediction (multiplier 0) is a fixed target (no grad); the mean is over the items."""
    if not config.dop_class:
        return 0.0
    if lora is None:
        raise ValueError("DOP (dop_class) needs the trained LoRA passed to micro_batch_loss")
    device = next(dit.parameters()).device
    x0, noise, sigmas = x0.to(device), noise.to(device), sigmas.to(device)
    caps = [item.preservation_features.to(device) for item in batch]
    multiplier, lora.multiplier = lora.multiplier, 0.0
    try:
        with torch.no_grad():
            prior = predicted_velocity(dit, x0, noise, sigmas, caps).float()
    finally:
        lora.multiplier = multiplier
    kept = predicted_velocity(dit, x0, noise, sigmas, caps).float()
    return config.dop_multiplier * (kept - prior).square().flatten(1).mean(1).mean()


def _share_loss(dit: nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                caps: list[torch.Tensor], config: TrainConfig) -> torch.Tensor:
    """The mean loss of some items at their drawn noise and σ."""
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

    def __init__(self, dit, lora: TrainableLora, items, config: TrainConfig, empty_caption, adapter,
                 world: World = SINGLE) -> None:
        self.dit, self.lora, self.items, self.config = dit, lora, items, config
        self.empty_caption, self.adapter, self.world = empty_caption, adapter, world
        self.params = [p for _, p in sorted(lora.named_parameters())]
        self.opt = make_optimizer(self.params, config)
        self.batches = BucketBatches(items, config.batch_size * world.size, config.seed)  # the global batch
        self.step, self.losses = 0, []
        self.last_checkpoint: Path | None = None
        self.ema = LoraEMA(lora, config.ema_decay) if config.ema_decay > 0 else None
        self.previewer: PreviewRunner | None = None
        self.on_preview: OnPreview | None = None
        self.previews: list[tuple[int, torch.Tensor]] = []

    def train(self, on_step: OnStep | None, should_stop: Callable[[], bool] | None) -> TrainResult:
        cfg = self.config
        interrupted = False
        while self.step < cfg.steps:
            lr = lr_at(self.step, cfg)
            loss = self.train_step(lr)
            if self.ema is not None:
                self.ema.update()
            self.step += 1
            self.losses.append(loss)
            if on_step is not None:
                on_step(self.step, loss, lr)
            if self.world.any(should_stop is not None and should_stop()):
                interrupted = True
                break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
            if self.previewer is not None and self.step < cfg.steps and self.previewer.previews.due(self.step,
                                                                                                    cfg.steps):
                self.preview()
        self.save()
        if self.previewer is not None and not interrupted:  # the last preview after the last save
            self.preview()
        if self.ema is not None:  # what the run hands back is what it saved
            self.ema.copy_to_params()
        return TrainResult(self.lora, list(self.losses), self.step, self.last_checkpoint, interrupted,
                           list(self.previews))

    def preview(self) -> None:
        """Sample the preview captions (the main process only) with the current LoRA, or its EMA."""
        if not self.world.is_main:
            return
        with self.ema.swapped_in() if self.ema is not None else nullcontext():
            latents = self.previewer.render(self.lora)
        self.previews.append((self.step, latents.detach().float().cpu()))
        if self.on_preview is not None:
            self.on_preview(self.step, latents)

    def train_step(self, lr: float) -> float:
        cfg = self.config
        for group in self.opt.param_groups:
            group["lr"] = lr
        gen = step_generator(cfg.seed, self.step)
        total = 0.0
        for _ in range(cfg.grad_accumulation):
            loss = micro_batch_loss(self.dit, self.batches.next_batch(), gen, cfg, self.empty_caption, self.world,
                                    self.lora)
            if loss is None:  # this rank's share of a short last batch is empty
                continue
            if torch.isfinite(loss):
                (loss / cfg.grad_accumulation).backward()
            total += loss.item() / cfg.grad_accumulation
        total = self.world.sum(total)  # every rank sees the same loss, so a NaN stops them all
        if not math.isfinite(total):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {total}; lower the learning rate")
        self.world.sum_gradients(self.params)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    # ---- checkpoints ----

    def save(self) -> Path:
        cfg, stem = self.config, f"{self.config.name}_{self.step:06d}"
        if not self.world.is_main:  # rank 0 writes; the others only know the name
            self.last_checkpoint = cfg.output_dir / f"{stem}.safetensors"
            return self.last_checkpoint
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        with self.ema.swapped_in() if self.ema is not None else nullcontext():  # EMA on: the file holds the EMA
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
        if self.ema is not None:
            tensors |= self.ema.state_tensors()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        epoch, position = self.batches.state()
        meta = {"format": STATE_FORMAT, "step": str(self.step), "epoch": str(epoch), "position": str(position),
                "fingerprint": self.config.fingerprint(), "dataset": dataset_id(self.items),
                "config": json.dumps(self.config.fingerprint_fields(), sort_keys=True),
                "optim_groups": json.dumps(opt_state["param_groups"]), "optim_scalars": json.dumps(scalars),
                "losses": json.dumps(self.losses), "world_size": str(self.world.size)}
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
        if self.ema is not None:
            self.ema.load_state(tensors, state.path)
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


def check_optimizer(kind: OptimizerKind) -> None:
    """An optimizer this Python can build, or an ImportError saying what to install (checked before any work)."""
    if kind is OptimizerKind.ADAMW_8BIT and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("optimizer ADAMW_8BIT needs bitsandbytes (pip install bitsandbytes); "
                          "or use ADAMW / ADAFACTOR")


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = config.learning_rate, config.weight_decay
    check_optimizer(config.optimizer)
    if config.optimizer is OptimizerKind.ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer is OptimizerKind.ADAMW_8BIT:
        import bitsandbytes as bnb

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
