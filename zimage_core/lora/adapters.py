"""One module's adapter from a LoRA file, and the dense weight change it stands for (ZIMAGE_SPEC §6).

Scale conventions (those of ComfyUI's loader, which every trainer's file is written for):
- LoRA: ΔW = (alpha / r) · up · (mid ·) down, r = down's rows; no alpha key → scale 1 (PEFT files: alpha = r).
- LoHa: ΔW = (alpha / r) · (w1a·w1b) ⊙ (w2a·w2b), r = w1b's rows.
- LoKr: ΔW = scale · kron(w1, w2), each factor whole or a product (w?_a·w?_b); scale = alpha / r only when a
  factor is a product (r = that product's inner size), else 1.
- diff / diff_b: the full change of the weight / bias.
- DoRA (a magnitude vector m beside a LoRA): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (row norms over the input axis, PEFT's
  rule); at strength s the change is s · (W' − W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class AdapterKind(str, Enum):
    LORA = "lora"
    LOHA = "loha"
    LOKR = "lokr"
    DIFF = "diff"  # full delta of a weight (ComfyUI trainer: norms)
    DIFF_BIAS = "diff_b"  # full delta of a bias


_REQUIRED = {
    AdapterKind.LORA: ({"down", "up"}, {"mid", "alpha", "dora_scale"}),
    AdapterKind.LOHA: ({"w1a", "w1b", "w2a", "w2b"}, {"alpha", "dora_scale"}),
    AdapterKind.LOKR: (set(), {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "alpha", "dora_scale"}),
    AdapterKind.DIFF: ({"diff"}, set()),
    AdapterKind.DIFF_BIAS: ({"diff_b"}, set()),
}


def kind_of(roles: set[str]) -> AdapterKind:
    if "diff_b" in roles:
        return AdapterKind.DIFF_BIAS
    if "diff" in roles:
        return AdapterKind.DIFF
    if roles & {"w1a", "w1b", "w2a", "w2b"}:
        return AdapterKind.LOHA
    if roles & {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"}:
        return AdapterKind.LOKR
    return AdapterKind.LORA


@dataclass(frozen=True)
class Adapter:
    """The tensors of one foreign module's adapter (by role), checked for consistency at construction."""

    name: str  # the file's module key, for messages (e.g. 'lora_unet_layers_0_attention_to_q')
    kind: AdapterKind
    tensors: dict[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        required, optional = _REQUIRED[self.kind]
        roles = set(self.tensors)
        if missing := required - roles:
            raise ValueError(f"{self.name}: {self.kind.value} adapter without {sorted(missing)} (has {sorted(roles)})")
        if extra := roles - required - optional:
            raise ValueError(f"{self.name}: unexpected {sorted(extra)} in a {self.kind.value} adapter")
        if self.kind is AdapterKind.LOKR and not ({"w1"} <= roles or {"w1_a", "w1_b"} <= roles) \
                or self.kind is AdapterKind.LOKR and not ({"w2"} <= roles or {"w2_a", "w2_b"} <= roles):
            raise ValueError(f"{self.name}: a LoKr adapter needs lokr_w1 (or _a and _b) and lokr_w2 (or _a and _b)")
        for role, t in self.tensors.items():
            if not (finite := torch.isfinite(t)).all():
                bad = t[~finite]
                raise ValueError(f"{self.name}.{role}: {bad.numel()} NaN or Inf values in the LoRA weights "
                                 f"(first: {bad[0].item()})")
        if "alpha" in self.tensors and float(self.tensors["alpha"]) == 0:
            raise ValueError(f"{self.name}: alpha is 0 (the adapter would do nothing); a file error")
        if self.kind is AdapterKind.LORA:
            down, up = self.tensors["down"], self.tensors["up"]
            inner = self.tensors["mid"].shape[:2] if "mid" in self.tensors else (down.shape[0], down.shape[0])
            if up.shape[1] != inner[0] or down.shape[0] != inner[1]:
                raise ValueError(f"{self.name}: rank mismatch, up {list(up.shape)} and down {list(down.shape)}")
        self._check_products()
        if "dora_scale" in self.tensors and self.tensors["dora_scale"].numel() != self.out_features:
            raise ValueError(f"{self.name}: DoRA magnitude {list(self.tensors['dora_scale'].shape)} for "
                             f"{self.out_features} output rows")

    def _check_products(self) -> None:
        """LoHa / LoKr factor pairs multiply (inner sizes agree), and LoHa's two products have one shape."""
        t = self.tensors
        pairs = {AdapterKind.LOHA: (("w1a", "w1b"), ("w2a", "w2b")),
                 AdapterKind.LOKR: (("w1_a", "w1_b"), ("w2_a", "w2_b"))}.get(self.kind, ())
        for a, b in pairs:
            if a in t and b in t and t[a].shape[1] != t[b].shape[0]:
                raise ValueError(f"{self.name}: rank mismatch, {a} {list(t[a].shape)} and {b} {list(t[b].shape)}")
        if self.kind is AdapterKind.LOHA:
            w1, w2 = [t["w1a"].shape[0], t["w1b"].shape[1]], [t["w2a"].shape[0], t["w2b"].shape[1]]
            if w1 != w2:
                raise ValueError(f"{self.name}: LoHa products of different shapes, w1 {w1} and w2 {w2}")

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind is AdapterKind.LORA:
            return t["down"].shape[0]
        if self.kind is AdapterKind.LOHA:
            return t["w1b"].shape[0]
        if self.kind is AdapterKind.LOKR:
            return t["w2_b"].shape[0] if "w2_b" in t else t["w1_b"].shape[0] if "w1_b" in t else None
        return None

    @property
    def alpha(self) -> float | None:
        return float(self.tensors["alpha"]) if "alpha" in self.tensors else None

    @property
    def scale(self) -> float:
        alpha, rank = self.alpha, self.rank
        return alpha / rank if alpha is not None and rank else 1.0

    @property
    def out_features(self) -> int:
        return self.delta_shape()[0]

    def delta_shape(self) -> tuple[int, ...]:
        t = self.tensors
        if self.kind is AdapterKind.LORA:
            return (t["up"].shape[0], t["down"].shape[1])
        if self.kind is AdapterKind.LOHA:
            return (t["w1a"].shape[0], t["w1b"].shape[1])
        if self.kind is AdapterKind.LOKR:
            w1 = t["w1"].shape if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1])
            w2 = t["w2"].shape if "w2" in t else (t["w2_a"].shape[0], t["w2_b"].shape[1])
            return (w1[0] * w2[0], w1[1] * w2[1])
        return tuple(t[self.kind.value].shape)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW at strength 1 (scale included), flattened to (out, in) for Linear weights; DoRA is not included."""
        if self.kind is AdapterKind.LORA:
            down, up = self._lora_factors(dtype, device)
            return self.scale * (up @ down)
        t = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        if self.kind is AdapterKind.LOHA:
            return self.scale * ((t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"]))
        if self.kind is AdapterKind.LOKR:
            w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
            w2 = t["w2"] if "w2" in t else t["w2_a"] @ t["w2_b"]
            return self.scale * torch.kron(w1, w2)
        return t[self.kind.value]

    def low_rank(self, dtype: torch.dtype, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(down (r, in), up·scale (out, r)) for a plain LoRA (the runtime path's two small matmuls), else None."""
        if self.kind is not AdapterKind.LORA or "dora_scale" in self.tensors:
            return None
        down, up = self._lora_factors(dtype, device)
        return down, up * self.scale

    def _lora_factors(self, dtype: torch.dtype, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA's (down (r, in), up (out, r)), a mid factor folded into down; scale not applied."""
        t = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        down = t["down"].flatten(1)
        if "mid" in t:
            down = t["mid"].flatten(1) @ down
        return down, t["up"].flatten(1)

    def apply_dora(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The DoRA weight W' for base rows `weight` (out, in) and this adapter's ΔW (fp32 in, fp32 out)."""
        m = self.tensors["dora_scale"].float().reshape(-1, 1)
        merged = weight.float() + delta
        if m.shape[0] != merged.shape[0]:
            raise ValueError(f"{self.name}: DoRA magnitude of {m.shape[0]} for {merged.shape[0]} output rows")
        return merged * (m / merged.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps))
