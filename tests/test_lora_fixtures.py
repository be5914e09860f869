"""Self-checks of tests/lora_fixtures.py against the real loaders, without our own LoRA code.

Locks in: every fixture format's dense ΔW equals what ComfyUI 0.3.75's own loader (`comfy.lora.load_lora` with the
key map of a tiny Z-Image `Lumina2` model, then `comfy.lora.calculate_weight`) merges into the canonical tensors,
and, for the formats diffusers 0.42.1 converts, what `ZImageLoraLoaderMixin.lora_state_dict` turns the file into
(B @ A per diffusers module, mapped onto the fused qkv rows). Documented pitfalls are asserted as facts: ComfyUI
drops the attention part of raw musubi / kohya-named LoHa files; diffusers cannot place diffusion-pipe's fused-qkv
lora_A/B LoRAs, rejects
LoHa and ComfyUI-trainer files, and drops DoRA magnitudes; ComfyUI 0.3.75 normalises output-axis DoRA by ‖W‖.
Breaks when a fixture writes a key layout or scale the real tools do not read the way the fixture claims.
(peft is not installed, so diffusers' `load_lora_adapter` itself cannot run here; its conversion step can.)
"""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import comfy_lora
from lora_fixtures import (
    ATTN_FFN,
    BAD_LORAS,
    FOREIGN_LORAS,
    Fmt,
    _blocks,
    _diffusers_targets,
    canonical_shapes,
    split_qkv_rows,
    targets,
    write_lora,
)
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit

STRENGTH = 0.7
BOUND = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops, one thread


@pytest.fixture(scope="module")
def dit():
    return diffusers_dit(seed=3)


@pytest.fixture(scope="module")
def base(dit) -> dict[str, torch.Tensor]:
    return comfy_state_dict(dit.state_dict())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


_WRITTEN: dict = {}


def written_lora(fmt: Fmt, folder):
    """Each format written once per session (the tests only read the files)."""
    if fmt not in _WRITTEN:
        _WRITTEN[fmt] = write_lora(fmt, folder / f"{fmt.value}.safetensors", seed=5)
    return _WRITTEN[fmt]


@pytest.fixture(scope="module")
def comfy_key_map(base):
    return comfy_lora.key_map(base)


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max()).item() for k in b)


# formats ComfyUI 0.3.75 routes as written, and the renames that make the others readable to it (math check only)
COMFY_NATIVE = {Fmt.MUSUBI_OTHER, Fmt.MUSUBI_COMFY, Fmt.AI_TOOLKIT, Fmt.DIFFUSION_PIPE, Fmt.COMFY_TRAINER,
                Fmt.OSTRIS_ADAPTER, Fmt.LOKR, Fmt.DORA}
COMFY_RENAME = {
    Fmt.MUSUBI: lambda k: "lycoris_" + k.removeprefix("lora_unet_"),
    Fmt.LOHA: lambda k: "lycoris_" + k.removeprefix("lora_unet_"),
    Fmt.PEFT_TRANSFORMER: lambda k: "diffusion_model." + k.removeprefix("transformer."),
    Fmt.PEFT_BASE_MODEL: lambda k: "diffusion_model." + k.removeprefix("base_model.model."),
    Fmt.DIFFSYNTH: lambda k: "diffusion_model." + k,
}


def test_canonical_shapes_match_the_comfy_layout(base):
    assert canonical_shapes(TINY) == {k: tuple(v.shape) for k, v in base.items() if k != "norm_final.weight"}
    rows = split_qkv_rows(TINY["dim"])
    assert [rows[p] for p in "qkv"] == [slice(0, 256), slice(256, 512), slice(512, 768)]


@pytest.mark.parametrize("fmt", list(Fmt), ids=lambda f: f.value)
def test_fixture_is_self_consistent(fmt, base, lora_dir):
    written = written_lora(fmt, lora_dir)
    assert sorted(load_file(written.path)) == written.keys
    assert written.deltas.keys() == {t.canonical for t in targets(fmt)} | (
        {k for k, s in canonical_shapes().items() if len(s) == 1} if fmt is Fmt.COMFY_TRAINER else set())
    for key, delta in written.deltas.items():
        assert delta.shape == base[key].shape and delta.dtype == torch.float32
        assert 0.03 < (delta.norm() / base[key].norm()).item() < 0.6, key  # visible, not overwhelming
    touched = " ".join(written.deltas)
    assert ("refiner" in touched) == (fmt in (Fmt.PEFT_TRANSFORMER, Fmt.PEFT_BASE_MODEL, Fmt.DIFFSYNTH,
                                              Fmt.DIFFUSION_PIPE, Fmt.COMFY_TRAINER))
    assert ("adaLN" in touched) == (fmt in (Fmt.AI_TOOLKIT, Fmt.OSTRIS_ADAPTER, Fmt.LOKR, Fmt.DORA,
                                            Fmt.DIFFUSION_PIPE, Fmt.COMFY_TRAINER))
    merged = written.merged(base, STRENGTH)
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == set(written.deltas)


def test_bf16_fixture_deltas_come_from_the_stored_tensors(base, tmp_path):
    written = write_lora(Fmt.MUSUBI, tmp_path / "bf16.safetensors", dtype=torch.bfloat16, alpha=2.0)
    sd = load_file(written.path)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    up = sd["lora_unet_layers_1_attention_to_v.lora_up.weight"].float()
    down = sd["lora_unet_layers_1_attention_to_v.lora_down.weight"].float()
    assert torch.equal(written.deltas["layers.1.attention.qkv.weight"][512:], 0.5 * up @ down)


@pytest.mark.parametrize("fmt", list(Fmt), ids=lambda f: f.value)
def test_comfyui_merges_each_format_as_its_dense_delta(fmt, base, comfy_key_map, lora_dir):
    written = written_lora(fmt, lora_dir)
    sd = load_file(written.path)
    if fmt in COMFY_NATIVE:
        got, missing = comfy_lora.merged(sd, comfy_key_map, base, STRENGTH)
        assert missing == []
    else:
        _, missing = comfy_lora.merged(sd, comfy_key_map, base, STRENGTH)
        if fmt in (Fmt.MUSUBI, Fmt.LOHA):
            # documented pitfall: kohya-named attention keys (to_q/to_k/to_v/to_out_0) match nothing in ComfyUI;
            # only the FFN keys (identical in both namings) load
            assert missing and all("_attention_to_" in k for k in missing)
            assert not any("feed_forward" in k for k in missing)
        else:  # ComfyUI 0.3.75 maps no `transformer.` / `base_model.model.` / bare diffusers names for Z-Image
            assert missing == sorted(sd)
        rename = COMFY_RENAME[fmt]
        got, missing = comfy_lora.merged({rename(k): v for k, v in sd.items()}, comfy_key_map, base, STRENGTH)
        assert missing == []
    expected = written.merged(base, STRENGTH, dora_norm="base" if fmt is Fmt.DORA else "adapted")
    assert max_rel(got, expected) <= BOUND
    assert {k for k in base if not torch.equal(got[k], base[k])} == set(written.deltas)


def test_comfyui_output_axis_dora_uses_the_base_norm(base, comfy_key_map, lora_dir):
    """ComfyUI 0.3.75 (`weight_adapter/base.py weight_decompose`) divides an output-axis DoRA by ‖W‖ rather than
    ‖W + ΔW‖ (Comfy-Org/ComfyUI PR #15458, open): `merged()` keeps the DoRA rule; the two differ visibly."""
    written = written_lora(Fmt.DORA, lora_dir)
    got, _ = comfy_lora.merged(load_file(written.path), comfy_key_map, base, 1.0)
    assert max_rel(got, written.merged(base, 1.0, dora_norm="base")) <= BOUND
    assert max_rel(got, written.merged(base, 1.0)) > 1e-3


def test_musubi_without_alpha_is_scale_one_in_comfyui(base, comfy_key_map, tmp_path):
    written = BAD_LORAS["musubi-no-alpha"](tmp_path / "noalpha.safetensors")
    sd = {"lycoris_" + k.removeprefix("lora_unet_"): v for k, v in load_file(written.path).items()}
    assert not any(k.endswith(".alpha") for k in sd)
    got, missing = comfy_lora.merged(sd, comfy_key_map, base, 1.0)
    assert missing == [] and max_rel(got, written.merged(base)) <= BOUND


def test_alpha_zero_is_a_no_op_in_comfyui(base, comfy_key_map, tmp_path):
    written = BAD_LORAS["alpha-zero"](tmp_path / "a0.safetensors")
    assert all(not d.any() for d in written.deltas.values())
    sd = {"lycoris_" + k.removeprefix("lora_unet_"): v for k, v in load_file(written.path).items()}
    got, _ = comfy_lora.merged(sd, comfy_key_map, base, 1.0)
    assert all(torch.equal(got[k], base[k]) for k in base)


# --------------------------------------------------------------------------------------------------- diffusers

# MUSUBI_COMFY: diffusers 0.42.1 does split a kohya `…_attention_qkv.lora_down/lora_up` (down replicated, up chunked
# in 3; the block-diagonal up makes that exact), contrary to ZIMAGE_SPEC §6.2's reading of an older version.
DIFFUSERS_LOADS = {Fmt.MUSUBI, Fmt.MUSUBI_OTHER, Fmt.MUSUBI_COMFY, Fmt.AI_TOOLKIT, Fmt.OSTRIS_ADAPTER,
                   Fmt.PEFT_TRANSFORMER, Fmt.DIFFSYNTH, Fmt.LOKR, Fmt.DORA}


def diffusers_deltas(converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense ΔW per canonical key from a diffusers/PEFT state dict (alpha already folded: scale 1)."""
    where = {t.name: t for t in _diffusers_targets(TINY, _blocks(TINY), (*ATTN_FFN, "adaLN_modulation.0"))}
    shapes = canonical_shapes()
    out: dict[str, torch.Tensor] = {}
    for key in converted:
        module, kind = key.removeprefix("transformer.").rsplit(".", 1)
        if kind == "weight":
            module, kind = module.rsplit(".", 1)
        if kind == "lora_A":
            d = converted[key.replace("lora_A", "lora_B")].float() @ converted[key].float()
        elif kind == "lokr_w1":
            w2 = converted.get(f"transformer.{module}.lokr_w2")
            if w2 is None:
                w2 = converted[f"transformer.{module}.lokr_w2_a"] @ converted[f"transformer.{module}.lokr_w2_b"]
            d = torch.kron(converted[key].float(), w2.float())
        else:
            continue
        t = where[module]
        out.setdefault(t.canonical, torch.zeros(shapes[t.canonical]))
        out[t.canonical][t.rows if t.rows is not None else slice(None)] += d
    return out


@pytest.mark.parametrize("fmt", list(Fmt), ids=lambda f: f.value)
def test_diffusers_conversion_gives_the_same_delta(fmt, dit, lora_dir):
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    written = written_lora(fmt, lora_dir)
    if fmt in (Fmt.LOHA, Fmt.COMFY_TRAINER):  # hada_* / .diff / .diff_b keys are left over: rejected
        with pytest.raises(ValueError, match="should be empty"):
            ZImageLoraLoaderMixin.lora_state_dict(str(written.path))
        return
    converted = ZImageLoraLoaderMixin.lora_state_dict(str(written.path))
    modules = {n for n, _ in dit.named_modules()}
    names = {k.removeprefix("transformer.").split(".lora_")[0].split(".lokr_")[0] for k in converted}
    if fmt is Fmt.PEFT_BASE_MODEL:  # passed through unchanged: no `transformer.` prefix, nothing for the transformer
        assert sorted(converted) == written.keys
        return
    assert all(k.startswith("transformer.") for k in converted)
    if fmt is Fmt.DIFFUSION_PIPE:  # fused qkv (and bare `out`) in lora_A/B form are neither split nor renamed
        assert any(n.endswith(".attention.qkv") for n in names) and not names <= modules
        return
    assert fmt in DIFFUSERS_LOADS and names <= modules
    got = diffusers_deltas(converted)
    assert got.keys() == written.deltas.keys()
    # DoRA: diffusers drops `dora_scale` (a warning) and keeps the plain LoRA: exactly the low-rank part
    for key, delta in written.deltas.items():
        assert ((got[key] - delta).abs().max() / delta.abs().max()).item() <= BOUND, key


# ----------------------------------------------------------------------------------------- foreign and bad files


@pytest.mark.parametrize("name", sorted(FOREIGN_LORAS))
def test_foreign_loras_fit_no_tiny_zimage_module(name, comfy_key_map, base, tmp_path):
    sd = load_file(FOREIGN_LORAS[name](tmp_path / f"{name}.safetensors"))
    assert sd
    if name == "lumina2":  # same names as Z-Image's, so only the shapes tell: in_features 2304 ≠ dim
        assert "diffusion_model.layers.0.attention.qkv.lora_A.weight" in sd
        assert all(v.shape[-1] == 2304 for k, v in sd.items() if ".lora_A." in k)
        assert sd["diffusion_model.layers.0.attention.qkv.lora_B.weight"].shape[0] == 3840
    else:
        _, missing = comfy_lora.merged(sd, comfy_key_map, base, 1.0)
        assert missing == sorted(sd)


def test_bad_files(tmp_path):
    assert load_file(BAD_LORAS["empty"](tmp_path / "empty.safetensors")) == {}
    with pytest.raises(SafetensorError):
        load_file(BAD_LORAS["not-safetensors"](tmp_path / "bad.safetensors"))
    sd = load_file(BAD_LORAS["rank-mismatch"](tmp_path / "rank.safetensors"))
    a = sd["diffusion_model.layers.0.attention.to_q.lora_A.weight"]
    b = sd["diffusion_model.layers.0.attention.to_q.lora_B.weight"]
    assert a.shape[0] == 4 and b.shape[1] == 3
    sd = load_file(BAD_LORAS["nan"](tmp_path / "nan.safetensors"))
    assert sum(int(v.isnan().sum()) for v in sd.values()) == 1
