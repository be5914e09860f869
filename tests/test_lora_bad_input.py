"""Locks in what a bad LoRA file does: ONE clear error naming the file and the key/value, or a reported warning,
and never a LoRA applied halfway (all of it applies, or nothing: DiT weights bit-identical, no runtime hook left).

Cases (issue 6 "Bad input"): an empty file, bytes that are not safetensors, a pickle, a LoRA / LoHa with a rank
mismatch between its factors, NaN or Inf in a weight, alpha 0 (an error: the adapter would do nothing), a DoRA
magnitude of the wrong length, LoRAs of other model families (Flux, SDXL: no key fits; Lumina-2: the same key
names with other shapes), the bad LoRA second in a list after a good one, and a merge failing halfway (as out of
memory would). Alpha missing from a kohya/musubi file is not an error: ZIMAGE_SPEC §6.2 and ComfyUI read it at
scale 1 (tests/test_lora_fixtures.py checks ComfyUI does), so ours does too, but says so in `LoraFile.warnings`
and in the apply report, because musubi always writes alpha (default 1 → 1/rank) and a stripped file acts rank×
stronger than trained.

Breaks on: an adapter error that does not name the file, a torch RuntimeError instead of a ValueError, a merge
that leaves earlier parameters changed when a later one fails, or a missing alpha that passes silently.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_fixtures import BAD_LORAS, FOREIGN_LORAS, Fmt, write_lora
from test_bad_input import error_of
from zimage_core import load_dit
from zimage_core.dit import Linear
from zimage_core.lora import ApplyMode, apply_loras, read_lora
from zimage_core.lora import apply as apply_module
from zimage_fixtures import comfy_state_dict, diffusers_dit, inputs, rel_err


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_lora") / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=3).state_dict()), path)
    return load_dit(path, "cpu", torch.float32)


def snapshot(dit) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in dit.state_dict().items()}


def assert_untouched(dit, before: dict[str, torch.Tensor]) -> None:
    after = dit.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed apply changed a weight"
    assert all(m.delta is None for m in dit.modules() if isinstance(m, Linear)), "a failed apply left a hook"


def one_line_error(call, *parts: str) -> str:
    return error_of(call, ValueError, *parts)


def edited(fmt: Fmt, path, edit) -> object:
    """A fixture LoRA of `fmt` with `edit(state_dict)` applied, saved back to `path`."""
    write_lora(fmt, path)
    sd = load_file(path)
    edit(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _set(key: str, make):
    def edit(sd):
        sd[key] = make(sd[key])
    return edit


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[1, 2] = float("-inf")
    return t


# each: a file writer → the parts its error must contain (file name first, then the key or value)
READ_ERRORS = {
    "empty": (lambda p: BAD_LORAS["empty"](p), ("empty LoRA file",)),
    "not-safetensors": (lambda p: BAD_LORAS["not-safetensors"](p), ("not a safetensors file",)),
    "rank-mismatch": (lambda p: BAD_LORAS["rank-mismatch"](p),
                      ("diffusion_model.layers.0.attention.to_q", "rank mismatch", "[256, 3]", "[4, 256]")),
    "nan": (lambda p: BAD_LORAS["nan"](p), ("diffusion_model.layers.1.feed_forward.w2.down", "NaN or Inf", "nan")),
    "inf": (lambda p: edited(Fmt.MUSUBI, p, _set("lora_unet_layers_0_feed_forward_w3.lora_up.weight", _inf)),
            ("lora_unet_layers_0_feed_forward_w3.up", "NaN or Inf", "-inf")),
    "alpha-zero": (lambda p: BAD_LORAS["alpha-zero"](p), ("lora_unet_layers_0_attention_to_", "alpha is 0")),
    "loha-rank-mismatch": (lambda p: edited(Fmt.LOHA, p, _set("lora_unet_layers_1_feed_forward_w2.hada_w2_b",
                                                              lambda t: t[:3])),
                           ("lora_unet_layers_1_feed_forward_w2", "rank mismatch", "w2a [256, 4]", "w2b [3, 682]")),
    "dora-magnitude": (lambda p: edited(Fmt.DORA, p, _set("diffusion_model.layers.1.feed_forward.w2.dora_scale",
                                                          lambda t: t[:5])),
                       ("diffusion_model.layers.1.feed_forward.w2", "DoRA magnitude [5, 1]", "256 output rows")),
    "flux-kohya": (FOREIGN_LORAS["flux-kohya"], ("a Flux LoRA", "lora_unet_double_blocks_0")),
    "flux-diffusers": (FOREIGN_LORAS["flux-diffusers"], ("a Flux LoRA", "transformer.")),
    "sdxl": (FOREIGN_LORAS["sdxl"], ("a SD 1.x/SDXL LoRA", "lora_te1_")),
}


@pytest.mark.parametrize("case", sorted(READ_ERRORS))
def test_bad_file_is_one_error_naming_file_and_key(case, tmp_path):
    write, parts = READ_ERRORS[case]
    path = tmp_path / f"{case}.safetensors"
    write(path)
    one_line_error(lambda: read_lora(path), path.name, *parts)


def test_pickle_is_never_opened(tmp_path):
    for name in ("lora.pt", "lora.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"lora_unet_layers_0_attention_to_q.lora_down.weight": [0.0]}))
        one_line_error(lambda p=path: read_lora(p), name, "pickle")


@pytest.mark.parametrize("mode", list(ApplyMode), ids=lambda m: m.value)
def test_lumina2_shapes_are_refused_whole(mode, dit, tmp_path):
    """Lumina-2's LoRA uses Z-Image's own key names, so only the shapes tell: read passes, apply refuses it
    naming the key and both shapes, alone and as the second LoRA after a good one, and changes nothing."""
    lumina = read_lora(FOREIGN_LORAS["lumina2"](tmp_path / "lumina2.safetensors"))
    good = read_lora(write_lora(Fmt.AI_TOOLKIT, tmp_path / "good.safetensors").path)
    before = snapshot(dit)
    for loras in ([(lumina, 1.0)], [(good, 0.8), (lumina, 1.0)]):
        one_line_error(lambda ls=loras: apply_loras(dit, ls, mode), "lumina2.safetensors",
                       "diffusion_model.layers.0.attention", "[2304, 2304]", "[256, 256]", "Lumina-2")
        assert_untouched(dit, before)


@pytest.mark.parametrize("mode", list(ApplyMode), ids=lambda m: m.value)
def test_a_lora_naming_no_module_of_this_dit_is_refused_whole(mode, dit, tmp_path):
    """Z-Image keys for blocks this DiT lacks (a 30-layer LoRA on a 2-layer model): an error, nothing applied."""
    sd = {k.replace("layers_0_", "layers_29_").replace("layers_1_", "layers_28_"): v
          for k, v in load_file(write_lora(Fmt.MUSUBI, tmp_path / "deep.safetensors").path).items()}
    save_file(sd, tmp_path / "deep.safetensors")
    good = read_lora(write_lora(Fmt.AI_TOOLKIT, tmp_path / "good.safetensors").path)
    before = snapshot(dit)
    one_line_error(lambda: apply_loras(dit, [(good, 1.0), (read_lora(tmp_path / "deep.safetensors"), 1.0)], mode),
                   "deep.safetensors", "none of its 14 modules exists in this DiT")
    assert_untouched(dit, before)


def test_merge_failing_halfway_restores_what_it_changed(dit, tmp_path, monkeypatch):
    """A merge that fails on a later parameter (out of memory, say) rolls back the parameters already merged."""
    lora = read_lora(write_lora(Fmt.DIFFSYNTH, tmp_path / "ds.safetensors").path)
    real, calls = apply_module._merged, []

    def failing(name, *args):
        calls.append(name)
        if len(calls) == 5:
            raise MemoryError(f"no memory for {name}")
        return real(name, *args)

    monkeypatch.setattr(apply_module, "_merged", failing)
    before = snapshot(dit)
    with pytest.raises(MemoryError):
        apply_loras(dit, [(lora, 1.0)], ApplyMode.MERGED)
    assert len(calls) == 5
    assert_untouched(dit, before)


@pytest.mark.parametrize("mode", list(ApplyMode), ids=lambda m: m.value)
def test_musubi_without_alpha_is_scale_one_and_reported(mode, dit, tmp_path):
    written = BAD_LORAS["musubi-no-alpha"](tmp_path / "noalpha.safetensors")
    lora = read_lora(written.path)
    assert lora.alphas == [] and len(lora.warnings) == 1
    assert "14 of 14 modules have no alpha key" in lora.warnings[0] and "scale 1" in lora.warnings[0]
    base = comfy_state_dict(diffusers_dit(seed=3).state_dict())
    path = tmp_path / "expected.safetensors"
    save_file({k: v.contiguous() for k, v in written.merged(base, 1.0).items()}, path)
    before = snapshot(dit)
    with torch.no_grad():
        expected = load_dit(path, "cpu", torch.float32)(*inputs(1, [7], 8, 8))
        applied = apply_loras(dit, [(lora, 1.0)], mode)
        out = dit(*inputs(1, [7], 8, 8))
        applied.remove()
    assert rel_err(out, expected) <= 1e-5
    assert "warning: 14 of 14 modules have no alpha key" in applied.text()
    assert_untouched(dit, before)


def test_peft_files_without_alpha_are_not_warned_about(tmp_path):
    """PEFT-style files (AI Toolkit, diffusers, DiffSynth) never store alpha: scale 1 is their convention."""
    for fmt in (Fmt.AI_TOOLKIT, Fmt.DIFFSYNTH, Fmt.MUSUBI, Fmt.LOKR):
        assert read_lora(write_lora(fmt, tmp_path / f"{fmt.value}.safetensors").path).warnings == ()
