"""The sampler's convention, schedule, guidance and seeds.

Locks in: σ = 1 noise / σ = 0 data, the DiT called at t = 1 − σ returning v ≈ x0 − ε, Euler on −v
(an oracle model makes the sampler land on x0 for any schedule); the shift-3 Turbo σ table (pinned,
and equal to diffusers' FlowMatchEulerDiscreteScheduler on the pipeline's sigmas); exactly one DiT
call per step; CFG pred = pos + g·(pos − neg) with truncation and normalisation as diffusers 0.42.1;
ComfyUI's CPU noise for a seed. Breaks on any sign, time or schedule drift.
"""

import pytest
import torch

from zimage_core.sampling import (
    PRESETS,
    Preset,
    SamplerConfig,
    SamplingInterrupted,
    denoise,
    guided_velocity,
    make_noise,
    make_sigmas,
)

TURBO_SIGMAS = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0]  # shift 3, 8 steps (ZIMAGE_SPEC §5)


def test_turbo_sigma_table_is_pinned():
    assert make_sigmas(8, 3.0) == pytest.approx(TURBO_SIGMAS, abs=1e-6)


@pytest.mark.parametrize("steps,shift", [(8, 3.0), (25, 3.0), (50, 6.0)])
def test_schedule_equals_diffusers_scheduler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(steps))
    assert make_sigmas(steps, shift) == pytest.approx(sched.sigmas.tolist(), abs=1e-6)


class Oracle:
    """Knows the data x0 and answers with the exact v = x0 − ε implied by its input x at model time t."""

    def __init__(self, x0):
        self.x0, self.calls = x0, []

    def __call__(self, x, t, caps):
        self.calls.append((x.shape[0], t.clone()))
        sigma = (1 - t).view(-1, 1, 1, 1)
        eps = (x - (1 - sigma) * self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1)) / sigma
        return self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1) - eps


@pytest.mark.parametrize("sigmas", [make_sigmas(8, 3.0), make_sigmas(50, 6.0), [1.0, 0.7, 0.05, 0.0],
                                    sorted(torch.rand(12, generator=torch.Generator().manual_seed(0)).tolist() + [1.0],
                                           reverse=True) + [0.0]])
def test_oracle_model_lands_on_the_data_for_any_schedule(sigmas):
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    out = denoise(Oracle(x0), make_noise(0, x0.shape), [torch.zeros(3, 4)] * 2, PRESETS[Preset.TURBO], sigmas=sigmas)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_turbo_preset_is_exactly_eight_forwards_at_model_time_one_minus_sigma():
    oracle = Oracle(torch.zeros(1, 16, 4, 4))
    denoise(oracle, make_noise(3, (1, 16, 4, 4)), [torch.zeros(3, 4)], PRESETS[Preset.TURBO])
    assert len(oracle.calls) == 8 and all(b == 1 for b, _ in oracle.calls)
    assert [t.item() for _, t in oracle.calls] == pytest.approx([1 - s for s in TURBO_SIGMAS[:-1]], abs=1e-6)


def test_guidance_is_one_doubled_batch_per_step_and_truncation_switches_it_off():
    cfg = SamplerConfig(steps=10, guidance=2.0, shift=3.0, cfg_truncation=0.5)
    oracle = Oracle(torch.zeros(1, 16, 4, 4))
    denoise(oracle, make_noise(3, (1, 16, 4, 4)), [torch.zeros(3, 4)], cfg, neg=[torch.zeros(1, 4)])
    sigmas = make_sigmas(10, 3.0)[:-1]
    assert [b for b, _ in oracle.calls] == [2 if 1 - s <= 0.5 else 1 for s in sigmas]
    assert 1 in [b for b, _ in oracle.calls] and 2 in [b for b, _ in oracle.calls]


class TwoFaced:
    """Returns fixed raw outputs: `pos` for conditional items, `neg` for the negative half of a CFG batch."""

    def __init__(self, pos, neg):
        self.pos, self.neg = pos, neg

    def __call__(self, x, t, caps):
        return self.pos if x.shape[0] == 1 else torch.cat([self.pos, self.neg])


def test_cfg_formula_and_normalisation_match_diffusers():
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    x, sigma = torch.zeros(1, 16, 4, 4), 0.6
    plain = guided_velocity(TwoFaced(pos, neg), x, sigma, [None], [None], SamplerConfig(steps=1, guidance=3.0))
    torch.testing.assert_close(plain, -(pos + 3.0 * (pos - neg)))  # velocity is −(raw prediction)
    normed = guided_velocity(TwoFaced(pos, neg), x, sigma, [None], [None],
                             SamplerConfig(steps=1, guidance=3.0, cfg_normalization=1.0))
    # diffusers: if ‖pred‖ > ‖pos‖·c then pred ← pred · ‖pos‖·c / ‖pred‖
    want = pos + 3.0 * (pos - neg)
    want = want * (pos.norm() / want.norm()).clamp(max=1.0)
    torch.testing.assert_close(normed, -want)
    assert normed.norm() <= pos.norm() * (1 + 1e-6)
    no_guidance = guided_velocity(TwoFaced(pos, neg), x, sigma, [None], None, SamplerConfig(steps=1, guidance=0.0))
    torch.testing.assert_close(no_guidance, -pos)


def test_guidance_without_negative_features_is_an_error():
    with pytest.raises(ValueError, match="negative caption features"):
        guided_velocity(TwoFaced(torch.zeros(1), torch.zeros(1)), torch.zeros(1, 16, 2, 2), 0.5, [None], None,
                        SamplerConfig(steps=1, guidance=1.0))


def test_noise_is_comfyui_cpu_noise_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    ours = make_noise(1234, (2, 16, 8, 6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(ours, torch.randn(2, 16, 8, 6, generator=torch.manual_seed(1234)))
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"


def test_same_seed_is_bit_identical_and_progress_and_stop_are_honoured():
    oracle = Oracle(torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5)))
    steps = []
    a = denoise(oracle, make_noise(9, (1, 16, 4, 4)), [torch.zeros(3, 4)], PRESETS[Preset.TURBO],
                on_step=lambda i, n, x: steps.append((i, n)))
    b = denoise(oracle, make_noise(9, (1, 16, 4, 4)), [torch.zeros(3, 4)], PRESETS[Preset.TURBO])
    assert torch.equal(a, b) and steps == [(i, 8) for i in range(1, 9)]
    calls_before = len(oracle.calls)
    with pytest.raises(SamplingInterrupted, match="before step 4 of 8"):
        denoise(oracle, make_noise(9, (1, 16, 4, 4)), [torch.zeros(3, 4)], PRESETS[Preset.TURBO],
                should_stop=lambda: len(oracle.calls) - calls_before >= 3)
    assert len(oracle.calls) - calls_before == 3


def test_presets():
    assert PRESETS[Preset.TURBO] == SamplerConfig(steps=8, guidance=0.0, shift=3.0)
    assert (PRESETS[Preset.DE_TURBO].steps, PRESETS[Preset.DE_TURBO].guidance) == (25, 2.0)
    assert (PRESETS[Preset.BASE].steps, PRESETS[Preset.BASE].guidance, PRESETS[Preset.BASE].shift) == (50, 4.0, 6.0)
    with pytest.raises(ValueError, match="steps ≥ 1"):
        SamplerConfig(steps=0)
