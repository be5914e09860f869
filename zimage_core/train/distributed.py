"""Data-parallel training over `torch.distributed` (what DDP does, written out for LoRA parameters).

    torchrun --nproc_per_node 2 -m zimage_core train run.toml     # gloo on CPU, nccl on CUDA (cli_train.py)

Every rank holds the whole DiT and an identical LoRA (same seed), draws the same global batch of
`batch_size × world size` items with the same noise and σ (the step generator is a function of (seed, step)),
and runs forward/backward on its own contiguous share of it. Each rank's loss is the sum of its items'
losses divided by the GLOBAL batch size, so the SUM of the ranks' gradients (one all-reduce of one flat
buffer per step, after gradient accumulation, before clipping) is exactly the gradient of the single-process
mean: N ranks × batch b follow the run of one process with batch N·b, up to floating-point summation order.
Only rank 0 writes files; a stop request on any rank stops all of them after the same step.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def join_process_group(device: torch.device) -> World:
    """Under `torchrun` (WORLD_SIZE > 1 in the environment) set up the default process group, nccl for CUDA and
    gloo otherwise, destroyed at exit; otherwise (or when the caller already set one up) nothing to do."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return World.current()


def rank_device(device: torch.device) -> torch.device:
    """A bare `cuda` under torchrun means this rank's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        """The process group set up by the caller (`torch.distributed.init_process_group`), or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of `n` items (sizes differ by at most one; a rank
        may get none when the last batch of a bucket is smaller than the world)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """All-reduce (sum) the parameters' gradients in one flat buffer; a missing gradient counts as zero."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p).clone()

    def sum(self, value: float) -> float:
        """The sum of a number over the ranks (the step loss)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (a stop request)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE = World()  # one process


def _collective_device() -> torch.device:
    """Where a small tensor for a collective must live: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
