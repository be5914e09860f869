"""Training previews (`train_lora(previews=...)`) and the loss-curve image, on a one-layer random DiT, CPU.

Locks in:
- the preview sampler per base mode: TURBO_ADAPTER → Turbo (8 steps, g 0), DE_TURBO → 25 steps g 2, BASE → 25
  steps with the base model's guidance; bad Previews (every 0, 40 px, no captions, NaN, wrong caption width,
  guidance without a negative, TURBO_ADAPTER + block swap) fail before step 1 with one clear error;
- in TURBO_ADAPTER mode a run with previews trains the bit-identical LoRA (and losses) as one without, leaves
  the DiT's state bit-identical, previews after steps 2 and 3 (every 2 + the end), and the last preview equals
  sampling plain Turbo + the trained LoRA directly with noise seed + i (exactly), not Turbo + adapter + LoRA;
- loss_curve: (H, W, 3) in [0, 1]; a falling loss draws a curve whose rows go down the image; an empty and a
  one-element list draw; NaN is refused.
Breaks on: a preview that consumes training randomness or leaves the adapter out, previews with the adapter still
merged, an off-by-one preview schedule, a plot whose y axis is upside down.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import Fmt, write_lora
from train_fixtures import state_hash
from zimage_core import load_dit
from zimage_core.lora import ApplyMode, apply_loras, read_lora
from zimage_core.pipeline import sample
from zimage_core.sampling import SamplerConfig, make_noise
from zimage_core.train.config import BaseMode, TrainConfig
from zimage_core.train.data import TrainItem
from zimage_core.train.loop import train_lora
from zimage_core.train.plot import loss_curve
from zimage_core.train.previews import Previews, check_previews, preview_sampler
from zimage_core.train.timesteps import TimestepSampling
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit

SMALL = TINY | dict(n_layers=1, n_refiner_layers=1, axes_lens=[64, 64, 64])  # fewer blocks: faster on 2 cores


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("previews") / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=5, **SMALL).state_dict()), path)
    return path


@pytest.fixture()
def dit(dit_path):
    return load_dit(dit_path, "cpu", torch.float32)


def items() -> list[TrainItem]:
    g = torch.Generator().manual_seed(42)
    return [TrainItem(torch.randn(16, 4, 4, generator=g), torch.randn(6, 64, generator=g), "c", (32, 32), "item0")]


def captions() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(5, 64, generator=g), torch.randn(3, 64, generator=g)


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(rank=4, steps=3, learning_rate=5e-3, timestep_sampling=TimestepSampling.UNIFORM, seed=7,
                output_dir=tmp_path / "out", name="t")
    return TrainConfig(**(base | kw))


def test_preview_sampler_follows_the_model_the_lora_is_for():
    turbo, de_turbo, base = (preview_sampler(m) for m in (BaseMode.TURBO_ADAPTER, BaseMode.DE_TURBO, BaseMode.BASE))
    assert (turbo.steps, turbo.guidance, turbo.shift) == (8, 0.0, 3.0)
    assert (de_turbo.steps, de_turbo.guidance) == (25, 2.0)
    assert base.steps == 25 and base.guidance == 4.0 and base.shift == 6.0
    p = Previews(list(captions()), every=3)
    assert isinstance(p.captions, tuple) and [s for s in range(1, 11) if p.due(s, 10)] == [3, 6, 9, 10]


@pytest.mark.parametrize(("kw", "message"), [
    (dict(every=0), "every must be an integer ≥ 1"),
    (dict(width=40), "width 40: Z-Image needs a positive multiple of 16"),
    (dict(captions=()), "no captions"),
    (dict(captions=(torch.full((2, 64), math.nan),)), "caption 0 has NaN"),
    (dict(captions=(torch.zeros(64),)), r"caption 0 must be \(L ≥ 1, cap_dim\)"),
])
def test_bad_previews_fail_when_built(kw, message):
    with pytest.raises(ValueError, match=message):
        Previews(**({"captions": captions(), "every": 2} | kw))


def test_bad_previews_fail_before_step_1(dit, tmp_path):
    calls = []
    on_step = lambda *a: calls.append(a)  # noqa: E731
    with pytest.raises(ValueError, match="caption 1 has 32 features per token, this DiT takes 64"):
        train_lora(dit, items(), config(tmp_path), on_step=on_step,
                   previews=Previews((torch.zeros(2, 64), torch.zeros(2, 32)), every=1))
    with pytest.raises(ValueError, match="uses guidance 4 and needs negative caption features"):
        train_lora(dit, items(), config(tmp_path), on_step=on_step, previews=Previews(captions(), every=1))
    assert calls == [] and not (tmp_path / "out").exists()
    adapter = write_lora(Fmt.OSTRIS_ADAPTER, tmp_path / "adapter.safetensors", seed=3, cfg=SMALL).path
    swapping = config(tmp_path, base_mode=BaseMode.TURBO_ADAPTER, adapter_path=adapter, gradient_checkpointing=True,
                      blocks_to_swap=1)  # checked directly: this one-layer DiT cannot swap a block at all
    with pytest.raises(ValueError, match="not available with base_mode TURBO_ADAPTER and blocks_to_swap > 0"):
        check_previews(dit, Previews(captions(), every=1), swapping, None)
    sampler, negative = check_previews(dit, Previews(captions(), every=1), config(tmp_path), torch.zeros(1, 64))
    assert sampler == preview_sampler(BaseMode.BASE) and torch.equal(negative, torch.zeros(1, 64))


def test_previews_show_turbo_plus_lora_and_leave_training_untouched(dit, tmp_path):
    adapter = write_lora(Fmt.OSTRIS_ADAPTER, tmp_path / "adapter.safetensors", seed=3, cfg=SMALL).path
    cfg = config(tmp_path, base_mode=BaseMode.TURBO_ADAPTER, adapter_path=adapter)
    previews = Previews(captions(), every=2, width=32, height=32, seed=11, sampler=SamplerConfig(steps=2))
    before = state_hash(dit)
    seen = []
    with_previews = train_lora(dit, items(), cfg, previews=previews, on_preview=lambda s, x: seen.append((s, x)))
    assert state_hash(dit) == before, "the DiT changed (adapter left out or merged twice)"
    plain = train_lora(dit, items(), config(tmp_path / "b", base_mode=BaseMode.TURBO_ADAPTER, adapter_path=adapter))
    a, b = dict(with_previews.lora.named_parameters()), dict(plain.lora.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a) and with_previews.losses == plain.losses
    assert plain.previews == [] and [s for s, _ in with_previews.previews] == [2, 3] == [s for s, _ in seen]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(seen, with_previews.previews, strict=True))
    last = with_previews.previews[-1][1]
    assert last.shape == (2, 16, 4, 4) and last.dtype == torch.float32 and last.device.type == "cpu"

    def direct(adapter_merged: bool) -> torch.Tensor:
        applied = apply_loras(dit, [(read_lora(adapter), 1.0)], ApplyMode.MERGED) if adapter_merged else None
        try:
            with torch.no_grad(), with_previews.lora.attached():
                return torch.cat([sample(dit, make_noise(11 + i, (1, 16, 4, 4)), [cap], previews.sampler)
                                  for i, cap in enumerate(previews.captions)])
        finally:
            if applied is not None:
                applied.remove()

    turbo_lora, merged = direct(False), direct(True)
    gap = (merged - last).abs().max().item()
    print(f"last preview vs Turbo + LoRA: max |Δ| {(turbo_lora - last).abs().max().item():.3g}; "
          f"vs Turbo + adapter + LoRA: {gap:.3g}")
    assert torch.equal(turbo_lora, last)
    assert gap > 1e-3
    assert state_hash(dit) == before


def test_loss_curve_image():
    falling = [2.0 - 1.5 * i / 199 + 0.05 * math.sin(i) for i in range(200)]
    image = loss_curve(falling, width=300, height=160)
    assert image.shape == (160, 300, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0
    dark = image.sum(-1) < 1.0  # the smoothed curve (dark blue); the frame and the raw curve are lighter
    rows = [dark[:, c].nonzero()[:, 0].float().mean().item() for c in (30, 100, 170, 240) if dark[:, c].any()]
    print(f"smoothed curve rows at 4 columns: {[round(r) for r in rows]}")
    assert len(rows) == 4 and rows == sorted(rows) and rows[-1] - rows[0] > 60  # falls by most of the plot height
    rising = loss_curve(falling[::-1], width=300, height=160).sum(-1) < 1.0
    assert rising[:, 30].nonzero()[:, 0].float().mean() > rising[:, 240].nonzero()[:, 0].float().mean() + 60
    assert loss_curve([]).shape == (384, 768, 3) and (loss_curve([]) < 1).any()  # the bare frame
    one = loss_curve([0.5], width=100, height=60)
    assert (one.sum(-1) < 1.0).any()
    with pytest.raises(ValueError, match=r"loss 2 \(0-based\) is nan"):
        loss_curve([1.0, 0.9, math.nan])
