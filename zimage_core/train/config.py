"""`TrainConfig`: every option of a LoRA training run, as a frozen dataclass with Enums (no option strings).

    cfg = TrainConfig(steps=2000, base_mode=BaseMode.TURBO_ADAPTER, adapter_path=Path("adapter.safetensors"))
    cfg = TrainConfig.from_toml("run.toml")           # flat table of the same field names; unknown keys → error

Validation happens in `__post_init__`, so a bad value fails when the config is built, long before a model loads.
`fingerprint_fields()` is what a resume state must agree on (everything that changes the optimisation path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .lora_net import TrainTargets
from .timesteps import NoiseBias, TimestepSampling


class BaseMode(str, Enum):
    TURBO_ADAPTER = "turbo_adapter"  # Turbo + the ostris training adapter merged during training (ZIMAGE_SPEC §7.3)
    DE_TURBO = "de_turbo"  # the de-distilled De-Turbo DiT, trained like a base model
    BASE = "base"  # the base (non-distilled) Z-Image


class LRSchedule(str, Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # to 0 at `steps`, after the warmup
    LINEAR = "linear"  # to 0 at `steps`, after the warmup


class OptimizerKind(str, Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw_8bit"  # bitsandbytes
    ADAFACTOR = "adafactor"  # transformers.optimization.Adafactor, with our learning rate (relative_step off)


# Options that do not change the optimisation path up to a given step: a resume may change them.
# `steps` is one of them only with a constant schedule (cosine/linear decay depends on the total).
_RESUMABLE_CHANGES = ("save_every", "keep_last", "output_dir", "name", "gradient_checkpointing", "blocks_to_swap")


@dataclass(frozen=True)
class TrainConfig:
    base_mode: BaseMode = BaseMode.BASE
    adapter_path: Path | None = None  # the training adapter LoRA; TURBO_ADAPTER only
    rank: int = 16
    alpha: float | None = None  # None → rank (scale 1)
    targets: TrainTargets = TrainTargets.ATTN_FFN
    steps: int = 1000
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    scheduler: LRSchedule = LRSchedule.CONSTANT
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    weight_decay: float = 0.01
    grad_accumulation: int = 1
    batch_size: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    timestep_sampling: TimestepSampling = TimestepSampling.SHIFT
    shift: float = 3.0
    noise_bias: NoiseBias = NoiseBias.BALANCED
    sigmoid_scale: float = 1.0
    caption_dropout: float = 0.0  # probability of training an item on the empty caption
    differential_guidance_scale: float = 0.0  # 0 = off; AI Toolkit's default when on is 3 (ZIMAGE_SPEC §7.4)
    seed: int = 0
    save_every: int = 0  # 0 = only at the end (and on interrupt)
    keep_last: int = 0  # 0 = keep every checkpoint
    output_dir: Path = field(default_factory=lambda: Path("output"))
    name: str = "zimage_lora"
    trigger: str = ""
    ema_decay: float = 0.0  # 0 = off; else the saved LoRA is an EMA of the weights with this decay (ema.py)
    dop_class: str = ""  # "" = off; else DOP: the trigger word replaced by this class word (ZIMAGE_SPEC §7.4)
    dop_multiplier: float = 1.0  # weight of the DOP term
    gradient_checkpointing: bool = False  # recompute each block in the backward: less activation memory (dit.py)
    blocks_to_swap: int = 0  # the last N main layers rest on the CPU (offload.py); needs gradient_checkpointing

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _coerce(self, f)
        if self.alpha is None or (isinstance(self.alpha, int) and not isinstance(self.alpha, bool)):
            object.__setattr__(self, "alpha", float(self.rank if self.alpha is None else self.alpha))
        problems = [p for p in _problems(self) if p]
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """Plain JSON/TOML values: Enums by value, paths as strings (None fields omitted)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig: unknown option(s) {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(f"{path}: reading a TOML config needs Python 3.11 or newer (tomllib)") from None
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def fingerprint_fields(self) -> dict:
        """The options a resume state must share with this config."""
        skip = set(_RESUMABLE_CHANGES) | ({"steps"} if self.scheduler is LRSchedule.CONSTANT else set())
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        if self.adapter_path is not None:  # the adapter by file name: the folder may move between machines
            d["adapter_path"] = self.adapter_path.name
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint_fields(), sort_keys=True).encode()).hexdigest()


def _coerce(cfg: TrainConfig, f: dataclasses.Field) -> None:
    """Enum fields accept their value or NAME (TOML gives strings); path fields accept strings."""
    v = getattr(cfg, f.name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, Enum) and not isinstance(v, type(default)):
        enum = type(default)
        try:
            v = enum(v) if v in {m.value for m in enum} else enum[str(v).upper()]
        except (KeyError, TypeError):
            choices = ", ".join(m.name for m in enum)
            raise ValueError(f"TrainConfig: {f.name} must be one of {choices}, got {v!r}") from None
    elif f.name in ("adapter_path", "output_dir") and isinstance(v, str):
        v = Path(v)
    elif isinstance(default, bool):
        if not isinstance(v, bool):
            raise ValueError(f"TrainConfig: {f.name} must be true or false, got {v!r}")
    elif isinstance(default, int) and isinstance(v, bool):
        raise ValueError(f"TrainConfig: {f.name} must be a number, got {v!r}")
    elif isinstance(default, float) and isinstance(v, int):
        v = float(v)
    object.__setattr__(cfg, f.name, v)


def _problems(c: TrainConfig):
    def finite(name: str, lo: float, lo_open: bool = False) -> str | None:
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{name} must be a finite number, got {v!r}"
        if v < lo or (lo_open and v == lo):
            return f"{name} must be {'>' if lo_open else '≥'} {lo}, got {v}"
        return None

    def integer(name: str, lo: int) -> str | None:
        v = getattr(c, name)
        if not isinstance(v, int) or v < lo:
            return f"{name} must be an integer ≥ {lo}, got {v!r}"
        return None

    yield integer("steps", 1)
    yield integer("rank", 1)
    yield integer("warmup_steps", 0)
    yield integer("grad_accumulation", 1)
    yield integer("batch_size", 1)
    yield integer("save_every", 0)
    yield integer("keep_last", 0)
    yield integer("seed", 0)
    yield finite("learning_rate", 0.0, lo_open=True)
    yield finite("alpha", 0.0, lo_open=True)
    yield finite("weight_decay", 0.0)
    yield finite("max_grad_norm", 0.0)
    yield finite("shift", 0.0, lo_open=True)
    yield finite("sigmoid_scale", 0.0, lo_open=True)
    yield finite("differential_guidance_scale", 0.0)
    yield finite("caption_dropout", 0.0)
    if isinstance(c.caption_dropout, float) and c.caption_dropout >= 1.0:
        yield f"caption_dropout must be < 1, got {c.caption_dropout}"
    if c.base_mode is BaseMode.TURBO_ADAPTER and c.adapter_path is None:
        yield "base_mode TURBO_ADAPTER needs adapter_path (the training adapter LoRA file)"
    if c.base_mode is not BaseMode.TURBO_ADAPTER and c.adapter_path is not None:
        yield f"adapter_path is only used with base_mode TURBO_ADAPTER, not {c.base_mode.name}"
    if not c.name or any(ch in c.name for ch in "/\\:") or c.name.startswith("."):
        yield f"name must be a plain file-name stem, got {c.name!r}"
    yield integer("blocks_to_swap", 0)
    if isinstance(c.blocks_to_swap, int) and c.blocks_to_swap > 0 and not c.gradient_checkpointing:
        yield (f"blocks_to_swap {c.blocks_to_swap} needs gradient_checkpointing = true (without it autograd keeps "
               "every swapped block's weights on the device until the backward, so the swap saves nothing)")
    yield finite("ema_decay", 0.0)
    if isinstance(c.ema_decay, float) and c.ema_decay >= 1.0:
        yield f"ema_decay must be 0 (off) or in (0, 1), got {c.ema_decay}"
    yield finite("dop_multiplier", 0.0, lo_open=True)
    if not isinstance(c.dop_class, str) or not isinstance(c.trigger, str):
        yield f"dop_class and trigger must be strings, got {c.dop_class!r} and {c.trigger!r}"
    elif c.dop_class and not c.trigger:
        yield f"dop_class {c.dop_class!r} needs trigger (the word DOP replaces with the class word)"
