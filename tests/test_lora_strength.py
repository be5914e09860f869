"""The strength normaliser for stacking LoRAs on Turbo (zimage_core/lora/strength.py).

Locks in:
- `normalised_strengths` (the node contract): unchanged when Σ|sᵢ| ≤ budget, else scaled by budget/Σ|sᵢ| with signs
  and ratios kept; a bad budget or strength is a ValueError naming the value.
- `normalised_for` on a tiny DiT, measured through the real merge: after normalising, the change the stacked LoRAs
  make to every parameter, ‖W_merged − W‖_F, is at most `budget` × the largest single LoRA's change there. Two
  overlapping LoRAs at 1.0 exceed that bound un-normalised (so the check means something); LoRAs on disjoint
  modules keep their strengths, where the Σ|s| rule would halve them.
- `effect_norms` (the low-rank identity ‖U·D‖² = Σ(UᵀU)⊙(DDᵀ)) equals ‖ΔW‖ of the dense merge.

Breaks on: a normaliser that rescales strengths already inside the budget, flips a sign, changes the users' mix,
or lets the stacked change exceed one LoRA's worth on some module (what breaks the distilled model).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_fixtures import Fmt, write_lora
from zimage_core import load_dit
from zimage_core.lora import (
    ApplyMode,
    apply_loras,
    effect_norms,
    lora_from_state_dict,
    normalised_for,
    normalised_strengths,
    read_lora,
)
from zimage_fixtures import comfy_state_dict, diffusers_dit


@pytest.mark.parametrize(("strengths", "budget", "expected"), [
    ([0.3, 0.4], 1.0, [0.3, 0.4]),  # inside the budget: unchanged
    ([0.5, 0.5], 1.0, [0.5, 0.5]),  # exactly on it
    ([1.0, 1.0], 1.0, [0.5, 0.5]),  # the reported case: two LoRAs at 1.0 on Turbo
    ([1.2, -0.6], 1.0, [1.2 / 1.8, -0.6 / 1.8]),  # signs and the 2:1 mix kept
    ([1.0, 1.0, 1.0, 1.0], 2.0, [0.5, 0.5, 0.5, 0.5]),
    ([1.5], 1.0, [1.0]),  # one LoRA over budget is clamped too
    ([0.0, 0.0], 1.0, [0.0, 0.0]),
    ([], 1.0, []),
])
def test_normalised_strengths(strengths, budget, expected):
    got = normalised_strengths(strengths, budget)
    assert got == pytest.approx(expected, rel=1e-12)
    assert sum(abs(s) for s in got) <= budget * (1 + 1e-12)
    assert isinstance(got, list) and all(isinstance(s, float) for s in got)


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf, math.nan])
def test_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match=f"budget must be a finite number > 0, got {budget}"):
        normalised_strengths([1.0], budget)
    with pytest.raises(ValueError, match="budget"):
        normalised_for([], budget)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_bad_strength_is_refused(bad):
    with pytest.raises(ValueError, match=rf"LoRA strength 1 is {bad}"):
        normalised_strengths([0.5, bad])


# ------------------------------------------------------------------------------------------ measured on a tiny DiT


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    path = tmp_path_factory.mktemp("strength") / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=3).state_dict()), path)
    return load_dit(path, "cpu", torch.float32)


def merged_change(dit, loras) -> dict[str, float]:
    """‖W_merged − W‖_F per parameter, through the real merge (then removed)."""
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    applied = apply_loras(dit, loras, ApplyMode.MERGED)
    change = {k: (v.double() - before[k].double()).norm().item() for k, v in dit.state_dict().items()}
    applied.remove()
    return {k: c for k, c in change.items() if c > 0}


def lora_subset(path, keep) -> object:
    sd = load_file(path)
    return lora_from_state_dict({k: v for k, v in sd.items() if keep(k)}, path.name)


def test_effect_norms_equal_the_dense_merge(dit, tmp_path):
    for fmt in (Fmt.MUSUBI, Fmt.MUSUBI_COMFY, Fmt.LOHA, Fmt.LOKR, Fmt.COMFY_TRAINER):
        lora = read_lora(write_lora(fmt, tmp_path / f"{fmt.value}.safetensors").path)
        norms, dense = effect_norms(lora), merged_change(dit, [(lora, 1.0)])
        assert norms.keys() == dense.keys(), fmt
        for k, n in norms.items():
            assert n == pytest.approx(dense[k], rel=1e-4), (fmt, k)


def test_two_loras_at_one_are_bounded_by_one_lora(dit, tmp_path):
    """The Turbo complaint: two overlapping LoRAs at 1.0. Un-normalised some module moves by more than the
    strongest LoRA alone; with either normaliser (budget 1) no module does."""
    a = read_lora(write_lora(Fmt.MUSUBI, tmp_path / "a.safetensors", seed=1).path)
    b = read_lora(write_lora(Fmt.AI_TOOLKIT, tmp_path / "b.safetensors", seed=2, rank=8).path)
    single = [effect_norms(a), effect_norms(b)]
    bound = {k: max(s.get(k, 0.0) for s in single) for k in single[0].keys() | single[1].keys()}

    raw = merged_change(dit, [(a, 1.0), (b, 1.0)])
    assert max(raw[k] / bound[k] for k in raw) > 1.2, "the stacked LoRAs must exceed one LoRA for the test to mean much"
    for strengths in (normalised_strengths([1.0, 1.0]), normalised_for([(a, 1.0), (b, 1.0)])):
        assert strengths[0] == pytest.approx(strengths[1])  # the mix is kept
        change = merged_change(dit, [(a, strengths[0]), (b, strengths[1])])
        assert change.keys() == bound.keys()
        assert all(change[k] <= bound[k] * (1 + 1e-6) for k in change), strengths
    # the measured one scales less than Σ|s| (a and b do not change every module alike), never more
    assert 0.5 <= normalised_for([(a, 1.0), (b, 1.0)])[0] < 1.0


def test_disjoint_loras_keep_their_strengths(tmp_path):
    """An attention-only and an FFN-only LoRA touch no module in common: `normalised_for` leaves them at 1.0, where
    the Σ|s| rule halves both; over budget on their own they are still clamped, and a third LoRA overlapping one of
    them brings the factor down."""
    path = write_lora(Fmt.MUSUBI, tmp_path / "m.safetensors", seed=4).path
    attn = lora_subset(path, lambda k: "_attention_" in k)
    ffn = lora_subset(path, lambda k: "_feed_forward_" in k)
    assert not effect_norms(attn).keys() & effect_norms(ffn).keys()
    assert normalised_for([(attn, 1.0), (ffn, 1.0)]) == [1.0, 1.0]
    assert normalised_strengths([1.0, 1.0]) == [0.5, 0.5]
    assert normalised_for([(attn, 2.0), (ffn, -1.0)]) == pytest.approx([1.0, -0.5])
    assert normalised_for([(attn, 1.0), (ffn, 1.0), (attn, 1.0)]) == pytest.approx([0.5, 0.5, 0.5])


def test_a_weak_lora_beside_a_strong_one_costs_little(tmp_path):
    """Same modules, one LoRA with 1/10 of the other's effect: the Σ|s| rule halves the strong one; the measured
    rule takes off about 1/11."""
    strong = read_lora(write_lora(Fmt.AI_TOOLKIT, tmp_path / "s.safetensors", seed=5).path)
    sd = load_file(write_lora(Fmt.AI_TOOLKIT, tmp_path / "w.safetensors", seed=6).path)
    weak = lora_from_state_dict({k: v * 0.1 if ".lora_B." in k else v for k, v in sd.items()}, "weak")
    k = normalised_for([(strong, 1.0), (weak, 1.0)])[0]
    assert 0.85 < k < 0.95
    assert normalised_for([(strong, 0.5), (weak, 0.4)]) == [0.5, 0.4]  # inside the budget: unchanged
