"""A trainable LoRA on a loaded ZImageDiT, attached through `Linear.delta` (the runtime-LoRA protocol).

    lora = TrainableLora(dit, rank=16, alpha=16)          # fp32 params: down kaiming-uniform, up zeros (PEFT/musubi)
    with lora.attached():                                  # base weights untouched; the change is added at run time
        loss = flow_matching_loss(dit, x0, noise, sigmas, caps)
    lora.save("my_lora.safetensors", {"steps": "500"})     # ComfyUI format, readable by `read_lora`

ΔW = multiplier · (alpha / rank) · up @ down on each target; the fused `attention.qkv` gets three LoRAs (q, k, v
row blocks, musubi's to_q/to_k/to_v), so every target format holds the result without an SVD. The LoRA is
computed in the activation dtype (down/up cast to x's dtype, with autograd), added in place into the Linear's
output, or into its q/k/v column blocks when `forward_parts` calls it. The base is never written, and its
`requires_grad` is left as it is (the loop freezes the base; `load_dit` returns it frozen).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..dit import Linear, ZImageDiT
from ..keymaps import Target
from ..lora import Adapter, AdapterKind, LoraFile, LoraFormat, LoraPatch, TargetFormat, convert_lora, save_lora


class TrainTargets(str, Enum):
    ATTN_FFN = "attn_ffn"  # layers.*: attention.qkv (as q, k, v), attention.out, feed_forward.w1/w2/w3
    ATTN_FFN_ADALN = "attn_ffn_adaln"  # + layers.*.adaLN_modulation.0
    ALL = "all"  # + the same modules of the noise_refiner and context_refiner blocks


_MODULE = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\."
                     r"(attention\.qkv|attention\.out|feed_forward\.w[123]|adaLN_modulation\.0)$")


def _wanted(name: str, targets: TrainTargets) -> bool:
    m = _MODULE.match(name)
    if m is None:
        return False
    if m.group(1) != "layers" and targets is not TrainTargets.ALL:
        return False
    return m.group(2) != "adaLN_modulation.0" or targets is not TrainTargets.ATTN_FFN


class _Pair(nn.Module):
    """One LoRA: down (rank, in) and up (rows, rank), float32, for the `target` rows of a canonical Linear."""

    def __init__(self, target: Target, in_features: int, rows: int, rank: int, device: torch.device,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.target = target
        down = torch.empty(rank, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)  # nn.Linear's / PEFT's init, on the CPU
        self.down = nn.Parameter(down.to(device))
        self.up = nn.Parameter(torch.zeros(rows, rank, dtype=torch.float32, device=device))

    def file_name(self) -> str:
        """The module as a musubi file names it: diffusers names (to_q/to_k/to_v for the qkv row blocks)."""
        if self.target.parts == 1:
            return self.target.module
        return f"{self.target.module.removesuffix('qkv')}to_{'qkv'[self.target.part]}"


class _Delta:
    """Linear.delta for one module's pairs: adds multiplier · scale · (x·downᵀ)·upᵀ into the output's rows."""

    def __init__(self, owner: TrainableLora, pairs: list[_Pair], out_features: int) -> None:
        self.owner, self.pairs, self.out_features = owner, pairs, out_features

    def __call__(self, x: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        s = self.owner.multiplier * self.owner.scale
        if s == 0:
            return
        width = self.out_features // len(outs)
        for pair in self.pairs:
            rows = self.out_features // pair.target.parts
            start = pair.target.part * rows
            block, col = divmod(start, width)
            if col + rows > width:
                raise ValueError(f"{pair.target.module}: a LoRA on rows {start}:{start + rows} spans output blocks "
                                 f"of {width}")
            down = pair.down.to(device=x.device, dtype=x.dtype)
            up = pair.up.to(device=x.device, dtype=x.dtype)
            out = outs[block] if rows == width else outs[block][..., col:col + rows]
            out.add_(F.linear(F.linear(x, down), up), alpha=s)


class TrainableLora(nn.Module):
    """The trainable LoRA of one DiT (see the module docstring). Its parameters are the LoRA's only."""

    def __init__(self, dit: ZImageDiT, rank: int, alpha: float, targets: TrainTargets = TrainTargets.ATTN_FFN,
                 seed: int = 0) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"TrainableLora: rank must be a positive int, got {rank!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"TrainableLora: alpha must be a finite number > 0, got {alpha}")
        try:
            targets = TrainTargets(targets)
        except ValueError:
            raise ValueError(f"TrainableLora: unknown targets {targets!r}; one of "
                             f"{[t.value for t in TrainTargets]}") from None
        self.rank, self.alpha, self.targets = rank, float(alpha), targets
        self.scale = self.alpha / rank
        self.multiplier = 1.0
        generator = torch.Generator("cpu").manual_seed(seed)
        self._linears: dict[str, Linear] = {}  # a plain dict: the DiT's modules are not registered here
        self.pairs = nn.ModuleDict()
        for name, module in dit.named_modules():
            if not (isinstance(module, Linear) and _wanted(name, targets)):
                continue
            self._linears[name] = module
            parts = 3 if name.endswith("attention.qkv") else 1
            rows = module.out_features // parts
            for part in range(parts):
                key = name.replace(".", "_") + (f"_{'qkv'[part]}" if parts == 3 else "")
                self.pairs[key] = _Pair(Target(name, part, parts), module.in_features, rows, rank,
                                        module.weight.device, generator)
        if not self._linears:
            raise ValueError(f"TrainableLora: this DiT has no {targets.value} target modules")
        self._attached: list[Linear] = []

    def _pairs_of(self, name: str) -> list[_Pair]:
        return [p for p in self.pairs.values() if p.target.module == name]

    def attach(self) -> None:
        """Install the LoRA on its target modules (`Linear.delta`). Refuses a module that already has one."""
        if self._attached:
            raise RuntimeError("TrainableLora: already attached")
        busy = [name for name, m in self._linears.items() if m.delta is not None]
        if busy:
            raise RuntimeError(f"TrainableLora: {len(busy)} target modules already carry a runtime delta (e.g. "
                               f"{busy[0]}): remove the other LoRAs (or merge them) before attaching")
        for name, module in self._linears.items():
            module.delta = _Delta(self, self._pairs_of(name), module.out_features)
            self._attached.append(module)

    def detach(self) -> None:
        """Remove the LoRA's deltas (the modules' `delta` back to None). A no-op when not attached."""
        for module in self._attached:
            if isinstance(module.delta, _Delta) and module.delta.owner is self:
                module.delta = None
        self._attached = []

    @contextmanager
    def attached(self) -> Iterator[TrainableLora]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def lora_file(self, name: str = "trained") -> LoraFile:
        """The LoRA as read from a musubi file (detached float32 CPU copies, alpha kept): for apply_loras,
        convert_lora and save_lora. The multiplier is not included (it is a strength, given when applying)."""
        patches = []
        for pair in self.pairs.values():
            module = pair.file_name()
            tensors = {"down": pair.down.detach().float().cpu().clone(), "up": pair.up.detach().float().cpu().clone(),
                       "alpha": torch.tensor(self.alpha, dtype=torch.float32)}
            adapter = Adapter("lora_unet_" + module.replace(".", "_"), AdapterKind.LORA, tensors)
            patches.append(LoraPatch(module, pair.target, adapter))
        return LoraFile(name, LoraFormat.MUSUBI, tuple(patches), (), self.training_metadata())

    def training_metadata(self) -> dict[str, str]:
        return {"zimage_train_rank": str(self.rank), "zimage_train_alpha": f"{self.alpha:g}",
                "zimage_train_targets": self.targets.value}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the LoRA for ComfyUI's loader (`comfy` format, atomically) with the training metadata (rank,
        alpha, targets) and the caller's string metadata (which may not redefine the training keys)."""
        metadata = dict(metadata or {})
        if bad := [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]:
            raise ValueError(f"TrainableLora.save: metadata keys and values must be strings (e.g. {bad[0]!r})")
        ours = self.training_metadata()
        if clash := sorted(set(metadata) & set(ours)):
            raise ValueError(f"TrainableLora.save: metadata {clash} is written by the trainer itself")
        path = Path(path)
        converted = convert_lora(self.lora_file(path.stem), TargetFormat.COMFY)
        converted.metadata |= metadata | ours
        save_lora(converted, path)
        return path
