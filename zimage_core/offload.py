"""Block swap: the last n main `layers` of a ZImageDiT rest in CPU memory and visit the compute device one at a time.

    with swap_blocks(dit, 20):                # dit on the GPU: layers[-20:] move to pinned CPU memory
        dit.gradient_checkpointing = True     # what makes the swap pay off in training (below)
        loss = flow_matching_loss(dit, x0, noise, sigmas, caps)
        loss.backward()                       # each block is copied in again for its recomputation
    # every parameter and buffer is back on its device, bit for bit; the hooks are gone

musubi-tuner's `--blocks_to_swap` (ZIMAGE_SPEC §7.6: ≤ 28 of the 30 layers there; here ≤ n_layers − 1). A forward
pre-hook on each swapped block copies its weights to the compute device (the device of `dit.x_pad_token`, where
the rest of the DiT lives) just before the block runs, and a forward hook drops the copy after. Nothing is copied
back: base weights are frozen, so eviction only lets go of the device copy and the caching allocator reuses it.

Memory, per swapped block of weights W_b (≈ 0.36 GB in bf16 for the 6B model, ≈ 0.18 GB with fp8 weights):
- no grad (inference, previews): one swapped block is on the device at a time; (n − 1)·W_b less at the peak.
- training with `dit.gradient_checkpointing`: a checkpointed block saves only its inputs, so the copy is freed
  when the block's forward ends. The backward recomputes the block, which runs the pre-hook again (one more
  host→device copy per block and step), uses the copy for that block's backward, and frees it. The peak again
  holds about one swapped block.
- training without checkpointing: autograd keeps what each op needs for the backward, and for a frozen weight
  that is the weight itself (∂L/∂x of x·Wᵀ needs W; of x·w, w). Every swapped block's device copy then lives
  until the backward reaches it, so the peak is what it is without the swap. `TrainConfig` therefore refuses
  `blocks_to_swap` without `gradient_checkpointing`.

Why the Parameter objects are swapped, not their `.data`: autograd saves a leaf tensor itself, not a snapshot.
Re-pointing a weight's `.data` at the CPU copy after the forward would hand the backward a CPU tensor. During
a block's forward its `_parameters` / `_buffers` entries are fresh tensors on the device (what autograd saves,
kept alive exactly as long as it needs them); between forwards they are the original objects, whose data rests
on the CPU. The swapped weights must be frozen (a gradient would land on the temporary copy): a block
parameter that requires grad is an error. The trainable LoRA's parameters are not block weights; they stay on
the compute device. The eviction hook runs also when the forward raises, which is how a checkpoint's
recomputation ends once it has what the backward needs (early stop): every load has its eviction.

On CUDA the resting copies are pinned and loaded with `non_blocking=True`: the copy is queued on the current
stream, ahead of the block's kernels, and the Python thread does not wait for it (no prefetch on a side stream:
simple and always ordered). On MPS and the CPU plain copies are used; with the DiT on the CPU the swap moves
nothing (each block's tensors are re-wrapped as they are), which is how the tests check the hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .dit import ZImageDiT

OnMove = Callable[[int, bool], None]  # (layer index, True = loaded to the device / False = evicted)


@dataclass
class _Slot:
    """One parameter or buffer of a swapped block: where it lives in the module and where it rests."""

    table: dict  # the module's `_parameters` or `_buffers`
    name: str
    original: torch.Tensor  # the object the module holds between forwards (its data: `rest`)
    rest: torch.Tensor  # its data on the CPU (pinned on CUDA)
    before: torch.Tensor | None  # its data before the swap, kept when it was on the CPU (e.g. a file mapping)
    device: torch.device  # where its data was before the swap
    loaded: bool = False  # a device copy is in the module now


class BlockSwap:
    """`n` of `dit.layers` (the last ones) swapped to the CPU while installed; see the module docstring."""

    def __init__(self, dit: ZImageDiT, n: int, on_move: OnMove | None = None) -> None:
        n_layers = len(dit.layers)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= n_layers - 1:
            raise ValueError(f"blocks_to_swap must be an integer from 0 to {n_layers - 1} for this DiT "
                             f"({n_layers} layers; one stays on the device), got {n!r}")
        self.dit, self.n, self.on_move = dit, n, on_move
        self.device = dit.x_pad_token.device
        self.indices = list(range(n_layers - n, n_layers))
        self._slots: dict[int, list[_Slot]] = {}
        self._hooks: list = []
        self._resident: int | None = None

    def install(self) -> BlockSwap:
        if self._slots:
            raise RuntimeError("BlockSwap: already installed")
        trainable = [f"layers.{i}.{name}" for i in self.indices
                     for name, p in self.dit.layers[i].named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"BlockSwap: swapped blocks must be frozen, but {trainable[0]} requires grad "
                             f"({len(trainable)} such parameters)")
        pin = self.device.type == "cuda"
        for i in self.indices:
            block = self.dit.layers[i]
            self._slots[i] = [_rest(table, name, pin) for m in block.modules()
                              for table in (m._parameters, m._buffers) for name in list(table)
                              if table[name] is not None]
            self._hooks.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._load(i)))
            self._hooks.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._evict(i), always_call=True))
        return self

    def remove(self) -> None:
        """Remove the hooks and put every swapped tensor back on its device (the same object; bit-identical)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._resident is not None:
            self._evict(self._resident)
        for slots in self._slots.values():
            for s in slots:
                s.original.data = s.before if s.before is not None else s.rest.to(s.device)
        self._slots = {}

    def _load(self, i: int) -> None:
        if self._resident is not None and self._resident != i:
            self._evict(self._resident)
        if self._resident == i:
            return
        pinned = self.device.type == "cuda"
        for s in self._slots[i]:
            if s.table.get(s.name) is not s.original:  # replaced from outside for a while (previews take the
                continue  # merged training adapter out this way): the replacement is used as it is
            copy = s.rest.to(self.device, non_blocking=pinned)
            s.table[s.name] = nn.Parameter(copy, requires_grad=False) if isinstance(s.original, nn.Parameter) else copy
            s.loaded = True
        self._resident = i
        if self.on_move is not None:
            self.on_move(i, True)

    def _evict(self, i: int) -> None:
        if self._resident != i:
            return
        for s in self._slots[i]:
            if s.loaded:
                s.table[s.name], s.loaded = s.original, False
        self._resident = None
        if self.on_move is not None:
            self.on_move(i, False)


def _rest(table: dict, name: str, pin: bool) -> _Slot:
    """Point one tensor's data at its resting copy on the CPU (pinned when the compute device is CUDA)."""
    t = table[name]
    data = t.data
    if data.device.type == "cpu" and (data.is_pinned() or not pin):
        rest = data
    else:
        rest = torch.empty(data.shape, dtype=data.dtype, pin_memory=pin).copy_(data)
    t.data = rest
    return _Slot(table, name, t, rest, data if data.device.type == "cpu" else None, data.device)


@contextmanager
def swap_blocks(dit: ZImageDiT, n: int, on_move: OnMove | None = None) -> Iterator[BlockSwap]:
    """`BlockSwap(dit, n).install()` for the duration of the block; everything restored on exit (also on errors)."""
    swap = BlockSwap(dit, n, on_move).install()
    try:
        yield swap
    finally:
        swap.remove()
