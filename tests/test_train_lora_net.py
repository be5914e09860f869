"""The trainable LoRA, the timestep sampler and the flow-matching loss of zimage_core.train.

Locks in: a freshly initialised LoRA (up = 0) leaves the DiT output bit for bit; with random weights the
attached LoRA changes the output exactly as the same LoRA applied by the LoRA hub (`apply_loras`, runtime) and
as the dense-merged weights (≤ 1e-5 rel, fp32), with the multiplier scaling it (0 = base, −1 = negated ΔW);
gradients reach only the LoRA's parameters and the base state dict is bit-identical after a backward; `save`
writes a ComfyUI-format file that `read_lora` reads with zero unmatched keys, the metadata, and the same
output. The sampler's σ lie in (0, 1), repeat per seed, and move with the noise bias and shift as documented;
WEIGHTED's loss weights average 1. The loss is the convention x_σ = (1 − σ)x0 + σε, DiT(x_σ, 1 − σ) ≈ x0 − ε,
written out here by hand. Breaks on: a q/k/v LoRA in the wrong column block, a wrong alpha/rank scale, a
LoRA that writes or trains the base, a saved key ComfyUI would not match, a flipped sign or time in the loss.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import load_dit
from zimage_core.lora import ApplyMode, LoraFormat, apply_loras, read_lora
from zimage_core.train import (
    NoiseBias,
    TimestepSampling,
    TrainableLora,
    TrainTargets,
    differential_guidance_target,
    flow_matching_loss,
    loss_weights,
    sample_sigmas,
)
from zimage_fixtures import comfy_state_dict, diffusers_dit, inputs, rel_err

RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return comfy_state_dict(diffusers_dit(seed=3).state_dict())


def load(sd: dict[str, torch.Tensor], folder) -> torch.nn.Module:
    path = folder / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return load_dit(path, "cpu", torch.float32)


@pytest.fixture(scope="module")
def dit(base_sd, tmp_path_factory):
    return load(base_sd, tmp_path_factory.mktemp("train"))


def randomised(lora: TrainableLora, seed: int = 5) -> TrainableLora:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in lora.pairs.values():
            pair.up.copy_(torch.randn(pair.up.shape, generator=g) * 0.05)
    return lora


def run(dit) -> torch.Tensor:
    with torch.no_grad():
        return dit(*inputs(2, [7, 12], 8, 8))


def test_targets_cover_the_documented_modules(dit):
    names = {t.value: {p.target.module for p in TrainableLora(dit, RANK, ALPHA, t).pairs.values()}
             for t in TrainTargets}
    assert "layers.0.attention.qkv" in names["attn_ffn"] and "layers.1.feed_forward.w3" in names["attn_ffn"]
    assert not any("adaLN" in n or "refiner" in n for n in names["attn_ffn"])
    assert names["attn_ffn_adaln"] - names["attn_ffn"] == {"layers.0.adaLN_modulation.0", "layers.1.adaLN_modulation.0"}
    assert "noise_refiner.0.adaLN_modulation.0" in names["all"] and "context_refiner.1.attention.out" in names["all"]
    assert len(TrainableLora(dit, RANK, ALPHA).pairs) == 2 * 7  # q, k, v, out, w1, w2, w3 per layer


@pytest.mark.parametrize("targets", list(TrainTargets), ids=lambda t: t.value)
def test_attached_lora_equals_the_hub_and_the_merged_weights(targets, dit, base_sd, tmp_path):
    base = run(dit)
    lora = TrainableLora(dit, RANK, ALPHA, targets, seed=1)
    with lora.attached():
        assert torch.equal(run(dit), base), "up = 0 must leave the output bit for bit"
    randomised(lora)
    with lora.attached():
        out = run(dit)
        lora.multiplier = 0.0
        off = run(dit)
        lora.multiplier = -1.0
        negated = run(dit)
    lora.multiplier = 1.0
    assert all(m.delta is None for m in dit.modules() if hasattr(m, "delta")), "detach() must remove every delta"
    assert rel_err(out, base) > 1e-3, "the LoRA must change the output for the comparisons to mean anything"
    assert torch.equal(off, base)

    applied = apply_loras(dit, [(lora.lora_file(), 1.0)], ApplyMode.RUNTIME)
    hub, hub_neg = run(dit), None
    applied.set_strength(0, -1.0)
    hub_neg = run(dit)
    applied.remove()
    assert rel_err(out, hub) <= 1e-5 and rel_err(negated, hub_neg) <= 1e-5

    merged = dict(base_sd)
    for pair in lora.pairs.values():  # ΔW = (alpha / rank) · up @ down on the pair's rows of the canonical weight
        key, rows = f"{pair.target.module}.weight", pair.up.shape[0]
        w = merged[key].clone()
        w[pair.target.part * rows:(pair.target.part + 1) * rows] += ALPHA / RANK * (pair.up @ pair.down).detach()
        merged[key] = w
    assert rel_err(out, run(load(merged, tmp_path))) <= 1e-5


def test_gradients_reach_only_the_lora(dit):
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    lora = randomised(TrainableLora(dit, RANK, ALPHA, TrainTargets.ALL, seed=2))
    x, t, caps = inputs(2, [7, 12], 8, 8)
    with lora.attached():
        dit(x, t, caps).square().mean().backward()
    assert all(p.grad is None for p in dit.parameters()), "the base must get no gradient"
    grads = {k: p.grad for k, p in lora.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[k].abs().sum() > 0 for k in grads if k.endswith(".down")), "up ≠ 0: every down learns"
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items()), "the base must not change"
    assert set(before) == set(dit.state_dict())


def test_attach_refuses_a_module_with_a_delta(dit):
    a, b = TrainableLora(dit, RANK, ALPHA), TrainableLora(dit, RANK, ALPHA)
    with a.attached(), pytest.raises(RuntimeError, match="already carry a runtime delta"):
        b.attach()
    assert all(m.delta is None for m in dit.modules() if hasattr(m, "delta"))


def test_saved_file_loads_as_comfy_with_metadata_and_the_same_output(dit, tmp_path):
    lora = randomised(TrainableLora(dit, RANK, ALPHA, TrainTargets.ALL, seed=3))
    with lora.attached():
        expected = run(dit)
    path = lora.save(tmp_path / "trained.safetensors", {"zimage_steps": "12"})
    read = read_lora(path)
    assert read.unmatched == () and read.format is LoraFormat.COMFY
    assert all(k.startswith("diffusion_model.") for k in _keys(path))
    assert read.metadata["zimage_steps"] == "12" and read.metadata["zimage_train_rank"] == str(RANK)
    assert read.metadata["zimage_train_alpha"] == "2" and read.metadata["zimage_train_targets"] == "all"
    assert len({p.target.module for p in read.patches}) == len({p.target.module for p in lora.pairs.values()})
    applied = apply_loras(dit, [(read, 1.0)], ApplyMode.RUNTIME)
    out = run(dit)
    applied.remove()
    assert rel_err(out, expected) <= 1e-5
    with pytest.raises(ValueError, match="written by the trainer"):
        lora.save(tmp_path / "bad.safetensors", {"zimage_train_rank": "9"})


def _keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def _mean(method, bias=NoiseBias.BALANCED, **kw) -> float:
    return sample_sigmas(20000, method, torch.Generator().manual_seed(0), bias=bias, **kw).mean().item()


@pytest.mark.parametrize("method", list(TimestepSampling), ids=lambda m: m.value)
def test_sigmas_are_in_range_seeded_and_biased(method):
    s = sample_sigmas(5000, method, torch.Generator().manual_seed(4))
    assert s.dtype == torch.float32 and s.shape == (5000,) and (s > 0).all() and (s < 1).all()
    assert torch.equal(s, sample_sigmas(5000, method, torch.Generator().manual_seed(4)))
    assert not torch.equal(s, sample_sigmas(5000, method, torch.Generator().manual_seed(5)))
    assert _mean(method, NoiseBias.HIGH_NOISE) > _mean(method) + 0.1 > _mean(method, NoiseBias.LOW_NOISE) + 0.2


def test_shift_and_weights():
    assert _mean(TimestepSampling.SHIFT, shift=3.0) > _mean(TimestepSampling.LOGIT_NORMAL) + 0.1
    assert _mean(TimestepSampling.SHIFT, shift=1.0) == pytest.approx(_mean(TimestepSampling.LOGIT_NORMAL), abs=1e-6)
    s = sample_sigmas(20000, TimestepSampling.WEIGHTED, torch.Generator().manual_seed(0))
    w = loss_weights(s, TimestepSampling.WEIGHTED)
    assert w.mean().item() == pytest.approx(1.0, abs=0.02) and (w >= 0).all()
    assert loss_weights(torch.tensor([0.5]), "weighted") > loss_weights(torch.tensor([0.05]), "weighted")
    assert torch.equal(loss_weights(s, TimestepSampling.SHIFT), torch.ones_like(s))
    for bad in [dict(n=0), dict(shift=0.0), dict(sigmoid_scale=-1.0), dict(method="cosine")]:
        with pytest.raises(ValueError):
            sample_sigmas(**{"n": 4, "method": "shift", "generator": torch.Generator(), **bad})


def test_loss_is_the_convention_written_out():
    g = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    sigma, w = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.5, 1.0, 1.5])
    caps = [torch.zeros(1, 4)] * 3

    def toy(x, t, _caps):  # any known function of x and model time t
        return 2 * x + t.view(-1, 1, 1, 1)

    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    v = 2 * x_sigma + (1 - s)  # the DiT is called at t = 1 − σ
    per_item = ((v - (x0 - eps)) ** 2).mean(dim=(1, 2, 3))
    assert flow_matching_loss(toy, x0, eps, sigma, caps).item() == pytest.approx(per_item.mean().item(), rel=1e-6)
    assert flow_matching_loss(toy, x0, eps, sigma, caps, w).item() == pytest.approx((w * per_item).mean().item(),
                                                                                   rel=1e-6)

    def oracle(x, t, _caps):  # returns exactly x0 − ε given x_σ and t (inverting x_σ with the known ε)
        sig = (1 - t).view(-1, 1, 1, 1)
        return (x - sig * eps) / (1 - sig) - eps

    assert flow_matching_loss(oracle, x0, eps, sigma, caps).item() == pytest.approx(0.0, abs=1e-10)


def test_differential_guidance_target():
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    target = differential_guidance_target(pred, torch.tensor([2.0, 0.0]), 3.0)
    assert torch.equal(target, torch.tensor([4.0, -4.0])) and not target.requires_grad


def test_qkv_delta_is_the_same_through_forward_and_forward_parts(dit):
    lora = randomised(TrainableLora(dit, RANK, ALPHA, seed=4))
    qkv = dit.get_submodule("layers.0.attention.qkv")
    x = torch.randn(2, 5, qkv.in_features, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), lora.attached():
        whole, parts = qkv(x), torch.cat(qkv.forward_parts(x, 3), dim=-1)
        bf16 = torch.cat(qkv.forward_parts(x.bfloat16(), 3), dim=-1)  # the LoRA runs in the activation dtype
    assert bf16.dtype == torch.bfloat16 and rel_err(bf16, whole) < 3e-2
    assert rel_err(whole, parts) <= 1e-6 and rel_err(whole, qkv(x)) > 1e-3
