"""EMA of the LoRA weights and DOP (differential output preservation) in `train_lora`, one-layer random DiT, CPU.

Locks in:
- LoraEMA follows shadow ← d·shadow + (1 − d)·θ (float64 reference, 1e-6), swaps in and back bit-exactly and
  round-trips through its state tensors; a decay outside (0, 1) or a state without EMA is refused;
- with ema_decay on, resume stays bit-exact (4 straight steps vs 2 + 2: LoRA, EMA, optimizer tensors and losses
  identical), the saved LoRA file and TrainResult.lora hold the EMA (not the raw weights of the state), and the
  final preview is sampled with the EMA weights;
- DOP: the class prompt is the caption with the trigger replaced (build_items caches its features); its loss
  term is exactly 0 with zero gradients on a fresh LoRA (up = 0); after training, the LoRA changes the
  class-prompt prediction less with DOP than without (a measured ratio ≤ 0.8); DOP without preservation
  features, without a trigger, or with a caption lacking the trigger fails before anything runs.
Breaks on: EMA state missing from the resume file, a raw-weight LoRA file with EMA on, a DOP target that keeps
the LoRA on (or carries a gradient), the class caption built from the wrong text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zimage_core import load_dit
from zimage_core.pipeline import sample
from zimage_core.sampling import SamplerConfig, make_noise
from zimage_core.train.config import TrainConfig
from zimage_core.train.data import ImageCaption, TrainItem, build_items, class_caption
from zimage_core.train.ema import LoraEMA
from zimage_core.train.loop import preservation_loss, train_lora
from zimage_core.train.lora_net import TrainableLora
from zimage_core.train.loss import predicted_velocity
from zimage_core.train.previews import Previews
from zimage_core.train.timesteps import TimestepSampling
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit

SMALL = TINY | dict(n_layers=1, n_refiner_layers=1, axes_lens=[64, 64, 64])


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ema_dop") / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=6, **SMALL).state_dict()), path)
    return path


@pytest.fixture()
def dit(dit_path):
    return load_dit(dit_path, "cpu", torch.float32)


def make_items(n: int = 2, dop: bool = False) -> list[TrainItem]:
    g = torch.Generator().manual_seed(42)
    return [TrainItem(torch.randn(16, 4, 4, generator=g), torch.randn(6, 64, generator=g), f"photo of zxq {i}",
                      (32, 32), f"item{i}", torch.randn(5, 64, generator=g) if dop else None) for i in range(n)]


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(rank=4, steps=4, learning_rate=5e-3, timestep_sampling=TimestepSampling.UNIFORM, seed=7,
                output_dir=tmp_path / "out", name="t", trigger="zxq")
    return TrainConfig(**(base | kw))


def test_lora_ema_rule_swap_and_state():
    module = nn.Linear(3, 2)
    ema = LoraEMA(module, 0.9)
    ref = {k: p.detach().double().clone() for k, p in module.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        ref = {k: 0.9 * ref[k] + 0.1 * p.detach().double() for k, p in module.named_parameters()}
    for k in ref:
        torch.testing.assert_close(ema.shadow[k].double(), ref[k], rtol=1e-6, atol=1e-6)
    raw = {k: p.detach().clone() for k, p in module.named_parameters()}
    with ema.swapped_in():
        assert all(torch.equal(p, ema.shadow[k]) for k, p in module.named_parameters())
    assert all(torch.equal(p, raw[k]) for k, p in module.named_parameters())
    other = LoraEMA(nn.Linear(3, 2), 0.5)
    other.load_state(ema.state_tensors())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ref)
    with pytest.raises(ValueError, match="EMA weights do not match"):
        other.load_state({"lora.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        LoraEMA(module, 1.0)
    with pytest.raises(ValueError, match=r"ema_decay must be 0 \(off\) or in \(0, 1\), got 1.0"):
        config(Path("."), ema_decay=1)


def test_ema_resume_is_bit_exact_and_files_hold_the_ema(dit, tmp_path):
    items = make_items()
    previews = Previews((torch.randn(4, 64, generator=torch.Generator().manual_seed(1)),), every=100, width=32,
                        height=32, sampler=SamplerConfig(steps=1))
    kw = dict(ema_decay=0.7)
    straight = train_lora(dit, items, config(tmp_path / "a", **kw), previews=previews)
    train_lora(dit, items, config(tmp_path / "b", **(kw | {"steps": 2})))
    resumed = train_lora(dit, items, config(tmp_path / "b", **kw), previews=previews,
                         resume=tmp_path / "b" / "out" / "t_000002.state.safetensors")
    a, b = dict(straight.lora.named_parameters()), dict(resumed.lora.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a) and straight.losses == resumed.losses
    sa, sb = (load_file(p / "out" / "t_000004.state.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
    ema_keys = [k for k in sa if k.startswith("ema.")]
    assert sa.keys() == sb.keys() and len(ema_keys) == len(a)
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("rng."))
    ups = [k for k in a if k.endswith(".up")]
    gap = max((sa[f"lora.{k}"] - a[k]).abs().max().item() for k in ups)
    print(f"EMA vs raw LoRA weights at step 4: max |Δ up| {gap:.3g}")
    assert gap > 1e-4 and all(torch.equal(sa[f"ema.{k}"], a[k]) for k in a)  # the result holds the EMA
    saved = load_file(tmp_path / "a" / "out" / "t_000004.safetensors")
    straight.lora.save(tmp_path / "again.safetensors")
    again = load_file(tmp_path / "again.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    with torch.no_grad(), straight.lora.attached():
        direct = sample(dit, make_noise(0, (1, 16, 4, 4)), [previews.captions[0]], previews.sampler)
    assert [s for s, _ in straight.previews] == [4] and torch.equal(straight.previews[0][1], direct)


def test_dop_term_is_zero_with_no_gradient_on_a_fresh_lora(dit):
    items = make_items(dop=True)
    lora = TrainableLora(dit, 4, 4.0)
    dit.requires_grad_(False)
    x0 = torch.stack([i.latent for i in items])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    with lora.attached():
        loss = preservation_loss(dit, lora, items, x0, noise, torch.tensor([0.3, 0.7]), config(Path("."),
                                                                                              dop_class="dog"))
        loss.backward()
    assert loss.item() == 0.0 and lora.multiplier == 1.0
    assert all(p.grad is None or not p.grad.any() for p in lora.parameters())
    assert preservation_loss(dit, None, items, x0, noise, torch.tensor([0.3, 0.7]), config(Path("."))) == 0.0


def test_dop_keeps_the_class_prompt_prediction_closer(dit, tmp_path):
    items = make_items(1, dop=True)
    sigmas = torch.tensor([0.3, 0.6])
    x0 = items[0].latent.expand(2, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    caps = [items[0].preservation_features] * 2
    with torch.no_grad():
        base = predicted_velocity(dit, x0, noise, sigmas, caps)

    def change(**kw) -> float:
        lora = train_lora(dit, items, config(tmp_path / str(len(kw)), steps=6, learning_rate=1e-2, **kw)).lora
        with torch.no_grad(), lora.attached():
            return (predicted_velocity(dit, x0, noise, sigmas, caps) - base).norm().item()

    without, with_dop = change(), change(dop_class="dog", dop_multiplier=1.0)
    print(f"class-prompt prediction change: {without:.4f} without DOP, {with_dop:.4f} with (ratio "
          f"{with_dop / without:.2f})")
    assert without > 0 and with_dop / without <= 0.8


class _FakeTE:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, texts):
        self.seen += texts
        return [torch.full((len(t.split()), 64), float(len(t))) for t in texts]


class _FakeVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def encode(self, pixels):
        return torch.zeros(pixels.shape[0], 16, pixels.shape[2] // 8, pixels.shape[3] // 8)


def test_dop_items_and_errors(dit, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "a.png")
    examples = [ImageCaption(tmp_path / "a.png", "a photo of zxq, zxq smiling")]
    te = _FakeTE()
    built = build_items(examples, _FakeVAE(), te, resolutions=(64,), dop_class="man", trigger="zxq")
    assert te.seen == ["a photo of zxq, zxq smiling", "a photo of man, man smiling"]
    assert torch.equal(built[0].preservation_features, te.encode(["a photo of man, man smiling"])[0])
    assert build_items(examples, _FakeVAE(), _FakeTE(), resolutions=(64,))[0].preservation_features is None
    with pytest.raises(ValueError, match="a.png: DOP needs the trigger word 'zxq' in every caption"):
        build_items([ImageCaption(tmp_path / "a.png", "a photo")], _FakeVAE(), te, resolutions=(64,), dop_class="man",
                    trigger="zxq")
    with pytest.raises(ValueError, match="needs a non-empty trigger word"):
        class_caption("a photo", "", "man")
    with pytest.raises(ValueError, match="dop_class 'man' needs trigger"):
        config(tmp_path, dop_class="man", trigger="")
    with pytest.raises(ValueError, match="dop_multiplier must be > 0"):
        config(tmp_path, dop_class="man", dop_multiplier=0)
    with pytest.raises(ValueError, match=r"train item item0: DOP \(dop_class 'man'\) needs its class caption"):
        train_lora(dit, make_items(), config(tmp_path, dop_class="man"))
    assert not (tmp_path / "out").exists()
