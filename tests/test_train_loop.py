"""The LoRA training loop (`zimage_core.train.train_lora`) on a tiny random DiT, CPU, fixed seeds.

Locks in:
- training two fixed latents for 60 steps lowers their loss (fixed noise and σ, before vs after) by ≥ 50%,
  and only the LoRA changes: the DiT's state_dict hashes the same before and after, also in TURBO_ADAPTER
  mode where the training adapter is merged for the run and removed after;
- resume is exact: 40 straight steps vs 20 + resume to 40 give bit-identical LoRA parameters and losses;
- bad input fails once, clearly, before the first step: steps 0, a NaN learning rate, a resume state from
  another config (the error names the differing field), a Flux LoRA as the training adapter;
- an interrupted run leaves a loadable LoRA + resume state and no temporary files; keep_last prunes.
Breaks on: a base weight that trains or is left merged, noise/σ not tied to (seed, step), an optimizer or
sampler state that is not saved or restored, checks that run only after training started.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import Fmt, write_flux_kohya, write_lora
from train_fixtures import eval_loss, make_items, state_hash
from zimage_core import load_dit
from zimage_core.lora import ApplyMode, apply_loras, read_lora
from zimage_core.train.config import BaseMode, LRSchedule, OptimizerKind, TrainConfig
from zimage_core.train.loop import lr_at, read_state, train_lora
from zimage_core.train.lora_net import TrainTargets
from zimage_core.train.timesteps import TimestepSampling
from zimage_fixtures import comfy_state_dict, diffusers_dit


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=5).state_dict()), path)
    return path


@pytest.fixture()
def dit(dit_path):
    return load_dit(dit_path, "cpu", torch.float32)


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(rank=8, steps=50, learning_rate=2e-3, timestep_sampling=TimestepSampling.UNIFORM, seed=7,
                output_dir=tmp_path / "out", name="t", targets=TrainTargets.ALL)
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("mode", [BaseMode.BASE, BaseMode.TURBO_ADAPTER], ids=lambda m: m.value)
def test_training_lowers_the_loss_and_only_the_lora_changes(mode, dit, tmp_path):
    items = make_items()
    extra = {}
    if mode is BaseMode.TURBO_ADAPTER:
        extra["adapter_path"] = write_lora(Fmt.OSTRIS_ADAPTER, tmp_path / "adapter.safetensors", seed=3).path
    cfg = config(tmp_path, base_mode=mode, rank=16, steps=60, learning_rate=5e-3, batch_size=2, seed=3, **extra)
    before_hash = state_hash(dit)
    flags = {n: p.requires_grad for n, p in dit.named_parameters()}
    adapter = read_lora(cfg.adapter_path) if cfg.adapter_path else None

    def loss_with_adapter(lora=None) -> float:  # what the LoRA is trained against: base (+ adapter merged)
        applied = apply_loras(dit, [(adapter, 1.0)], ApplyMode.MERGED) if adapter else None
        try:
            return eval_loss(dit, items, lora)
        finally:
            if applied:
                applied.remove()

    before = loss_with_adapter()
    result = train_lora(dit, items, cfg)
    after = loss_with_adapter(result.lora)
    drop = 1 - after / before
    print(f"{mode.value}: eval loss {before:.4f} → {after:.4f} ({drop:.0%} lower) in {result.steps_done} steps; "
          f"train loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}")
    assert drop >= 0.5
    assert state_hash(dit) == before_hash, "a base weight changed (trained, or the adapter was left merged)"
    assert {n: p.requires_grad for n, p in dit.named_parameters()} == flags
    assert all(m.delta is None for m in dit.modules() if hasattr(m, "delta")), "the trained LoRA was left attached"
    assert result.steps_done == 60 and len(result.losses) == 60 and not result.interrupted
    assert result.last_checkpoint == tmp_path / "out" / "t_000060.safetensors"
    lora_file = read_lora(result.last_checkpoint)
    assert lora_file.metadata["zimage_train.base_mode"] == mode.value
    assert lora_file.metadata["zimage_train.adapter"] == (cfg.adapter_path.name if cfg.adapter_path else "")


@pytest.mark.parametrize("optimizer, steps", [(OptimizerKind.ADAMW, 40), (OptimizerKind.ADAFACTOR, 10)],
                         ids=["adamw", "adafactor"])
def test_resume_is_bit_identical(optimizer, steps, dit, tmp_path):
    items = make_items(3)
    kw = dict(steps=steps, batch_size=2, grad_accumulation=2, learning_rate=1e-3, optimizer=optimizer)
    straight = train_lora(dit, items, config(tmp_path / "a", **kw))
    first = train_lora(dit, items, config(tmp_path / "b", **(kw | {"steps": steps // 2})))
    state = first.last_checkpoint.with_name(f"t_{steps // 2:06d}.state.safetensors")
    resumed = train_lora(dit, items, config(tmp_path / "b", **kw), resume=state)
    a, b = dict(straight.lora.named_parameters()), dict(resumed.lora.named_parameters())
    equal = sum(torch.equal(a[k], b[k]) for k in a)
    print(f"resume ({optimizer.name}, {steps // 2} + {steps // 2} vs {steps}): {equal}/{len(a)} LoRA tensors "
          f"bit-identical; losses equal: {straight.losses == resumed.losses}")
    assert a.keys() == b.keys() and equal == len(a)
    assert straight.losses == resumed.losses and resumed.steps_done == steps
    assert any(p.abs().sum() > 0 for k, p in a.items() if k.endswith(".up")), "the LoRA never moved"


def test_bad_config_values_fail_with_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="steps must be an integer ≥ 1"):
        config(tmp_path, steps=0)
    with pytest.raises(ValueError, match=r"learning_rate must be a finite number, got nan") as e:
        config(tmp_path, learning_rate=math.nan)
    assert str(e.value).count(";") == 0
    with pytest.raises(ValueError, match="needs adapter_path"):
        config(tmp_path, base_mode=BaseMode.TURBO_ADAPTER)
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 10\nscheduler = "cosine"\nlearning_rat = 1e-4\nranks = 4\n')
    with pytest.raises(ValueError, match="unknown option.*learning_rat, ranks"):
        TrainConfig.from_toml(toml)
    toml.write_text(f'steps = 10\nscheduler = "COSINE"\noutput_dir = "{tmp_path}"\nalpha = 4\n')
    cfg = TrainConfig.from_toml(toml)
    assert cfg.scheduler is LRSchedule.COSINE and cfg.output_dir == tmp_path and cfg.alpha == 4.0
    assert isinstance(cfg.alpha, float) and cfg.fingerprint() == TrainConfig.from_dict(cfg.to_dict()).fingerprint()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_resume_and_adapter_fail_before_training(dit, tmp_path):
    items = make_items()
    calls = []
    first = train_lora(dit, items, config(tmp_path, steps=2))
    state = first.last_checkpoint.with_name("t_000002.state.safetensors")
    other = config(tmp_path, steps=4, learning_rate=5e-4, rank=4)
    with pytest.raises(ValueError, match=r"different training config.*learning_rate.*rank") as e:
        train_lora(dit, items, other, resume=state, on_step=lambda *a: calls.append(a))
    print("resume error:", e.value)
    with pytest.raises(ValueError, match="written for other training items"):
        train_lora(dit, make_items(3), config(tmp_path, steps=4), resume=state, on_step=lambda *a: calls.append(a))
    with pytest.raises(ValueError, match="not a training state"):
        train_lora(dit, items, config(tmp_path, steps=4), resume=first.last_checkpoint)
    flux = write_flux_kohya(tmp_path / "flux.safetensors")
    bad = config(tmp_path, base_mode=BaseMode.TURBO_ADAPTER, adapter_path=flux, output_dir=tmp_path / "flux_out")
    with pytest.raises(ValueError, match="training adapter.*flux.safetensors: a Flux LoRA") as e:
        train_lora(dit, items, bad, on_step=lambda *a: calls.append(a))
    print("adapter error:", e.value)
    assert calls == [] and not (tmp_path / "flux_out").exists()


def test_interrupt_leaves_a_resumable_checkpoint_and_no_temp_files(dit, tmp_path):
    items = make_items()
    seen = []
    cfg = config(tmp_path, steps=20, save_every=2, keep_last=2)
    result = train_lora(dit, items, cfg, on_step=lambda s, loss, lr: seen.append((s, loss, lr)),
                        should_stop=lambda: len(seen) >= 7)
    out = tmp_path / "out"
    assert result.interrupted and result.steps_done == 7 and [s for s, _, _ in seen] == list(range(1, 8))
    assert sorted(p.name for p in out.iterdir()) == ["t_000006.safetensors", "t_000006.state.safetensors",
                                                       "t_000007.safetensors", "t_000007.state.safetensors"]
    assert read_lora(result.last_checkpoint).patches
    assert read_state(out / "t_000007.state.safetensors", cfg).meta["step"] == "7"
    resumed = train_lora(dit, items, cfg, resume=out / "t_000007.state.safetensors")
    assert resumed.steps_done == 20 and not resumed.interrupted and len(resumed.losses) == 20
    assert not [p for p in out.iterdir() if p.name.startswith(".") or "tmp" in p.name]


def test_options_dropout_guidance_schedule_and_optional_optimizer(dit, tmp_path):
    items = make_items()
    cfg = config(tmp_path, steps=4, caption_dropout=0.5, differential_guidance_scale=3.0,
                 scheduler=LRSchedule.COSINE, warmup_steps=1, timestep_sampling=TimestepSampling.WEIGHTED)
    with pytest.raises(ValueError, match="caption_dropout > 0 needs empty_caption"):
        train_lora(dit, items, cfg)
    lrs = []
    result = train_lora(dit, items, cfg, empty_caption=torch.zeros(1, 64), on_step=lambda s, loss, lr: lrs.append(lr))
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    assert lrs == [lr_at(i, cfg) for i in range(4)] and lrs[0] == 1e-3 and lrs[1] == 2e-3 > lrs[2] > lrs[3] > 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="ADAMW_8BIT needs bitsandbytes"):
            train_lora(dit, items, config(tmp_path, optimizer=OptimizerKind.ADAMW_8BIT))
