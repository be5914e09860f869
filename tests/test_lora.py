"""The LoRA hub's reader and applier against independently written files of every trainer's format.

Locks in: each format (tests/lora_fixtures.py writes the exact key layout from the format rules) read by
`read_lora` and applied by `apply_loras` changes the DiT output exactly as the dense ΔW the fixture computed
on its own (≤ 1e-5 rel, fp32), in runtime and in merged mode; `remove()` restores every base tensor bit
for bit; several LoRAs stack with their own strengths; nothing names a module silently: unmatched keys are
reported. Breaks on a wrong key table, a wrong alpha/scale convention, a q/k/v row block in the wrong
place, or an un-merge that drifts.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import Fmt, write_lora
from zimage_core import load_dit
from zimage_core.lora import ApplyMode, apply_loras, read_lora
from zimage_fixtures import comfy_state_dict, diffusers_dit, inputs, rel_err

STRENGTH = 0.8


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return comfy_state_dict(diffusers_dit(seed=3).state_dict())


@pytest.fixture(scope="module")
def dit(base_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "dit.safetensors"
    save_file(base_sd, path)
    return load_dit(path, "cpu", torch.float32)


def output_of(sd: dict[str, torch.Tensor], tmp_path) -> torch.Tensor:
    path = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    with torch.no_grad():
        return load_dit(path, "cpu", torch.float32)(*inputs(2, [7, 12], 8, 8))


@pytest.mark.parametrize("fmt", list(Fmt), ids=lambda f: f.value)
@pytest.mark.parametrize("mode", list(ApplyMode), ids=lambda m: m.value)
def test_each_format_changes_the_output_as_its_dense_delta(fmt, mode, dit, base_sd, tmp_path):
    written = write_lora(fmt, tmp_path / f"{fmt.value}.safetensors")
    lora = read_lora(written.path)
    assert lora.unmatched == (), lora.unmatched
    expected = output_of(written.merged(base_sd, STRENGTH), tmp_path)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        base_out = dit(*inputs(2, [7, 12], 8, 8))
        applied = apply_loras(dit, [(lora, STRENGTH)], mode)
        out = dit(*inputs(2, [7, 12], 8, 8))
        applied.remove()
    print(f"{fmt.value} {mode.value}: {lora.format.value}, {len(lora.patches)} modules, rel err "
          f"{rel_err(out, expected):.1e}; the LoRA moves the output by {rel_err(base_out, expected):.1e}")
    assert rel_err(base_out, expected) > 1e-3, "the LoRA must change the output for the comparison to mean anything"
    assert rel_err(out, expected) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items()), "remove() must restore the base"


def test_two_loras_stack_with_their_own_strengths(dit, base_sd, tmp_path):
    a = write_lora(Fmt.MUSUBI, tmp_path / "a.safetensors", seed=1)
    b = write_lora(Fmt.AI_TOOLKIT, tmp_path / "b.safetensors", seed=2)
    expected = output_of(b.merged(a.merged(base_sd, 0.5), 1.2), tmp_path)
    with torch.no_grad():
        applied = apply_loras(dit, [(read_lora(a.path), 0.5), (read_lora(b.path), 1.2)], ApplyMode.RUNTIME)
        out = dit(*inputs(2, [7, 12], 8, 8))
        applied.set_strength(1, 0.0)  # runtime: a strength changes without re-applying
        only_a = dit(*inputs(2, [7, 12], 8, 8))
        applied.remove()
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(only_a, output_of(a.merged(base_sd, 0.5), tmp_path)) <= 1e-5
