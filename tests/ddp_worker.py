"""One training run for tests/test_train_ddp.py: `python ddp_worker.py DIT OUT BATCH` or the same under torchrun.

The DiT computes in float64 (the LoRA parameters stay float32), so the comparison of N processes × batch b with
one process × batch N·b sees the algorithm, not fp32 summation order amplified by Adam (test_train_ddp.py).
"""

import sys
from pathlib import Path

import torch

from zimage_core import load_dit
from zimage_core.train.config import TrainConfig
from zimage_core.train.data import TrainItem
from zimage_core.train.distributed import join_process_group
from zimage_core.train.loop import train_lora

STEPS = 5


def items(cap_dim: int) -> list[TrainItem]:
    g = torch.Generator().manual_seed(7)
    return [TrainItem(torch.randn(16, 8, 8, generator=g), torch.randn(5 + 4 * i, cap_dim, generator=g), f"c{i}",
                      (64, 64), f"item{i}") for i in range(4)]


def main(dit_path: str, out: str, batch: int) -> None:
    world = join_process_group(torch.device("cpu"))
    dit = load_dit(dit_path, "cpu", torch.float64)
    config = TrainConfig(steps=STEPS, rank=4, learning_rate=2e-3, batch_size=batch, targets="all",
                         timestep_sampling="logit_normal", output_dir=Path(out), name="ddp")
    result = train_lora(dit, items(dit.cfg.cap_feat_dim), config)
    if world.is_main:
        print("losses", " ".join(f"{x:.10f}" for x in result.losses))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
