"""LoRA conversion (`zimage_core.lora.convert`) against the fixture files of every trainer and the real loaders.

Locks in: every fixture format converted to comfy / diffusers / musubi, saved and read back, stands for the
fixture's own dense ΔW (≤ 1e-5 rel; LoKr/LoHa → LoRA by SVD within the error the converter reports); round trips
through comfy and diffusers give the same ΔW bit for bit where no scale is folded (≤ 1e-6 where one is) and the
same tensors where the layout allows; ComfyUI 0.3.75's own `load_lora` takes every key of a comfy output and
`calculate_weight` merges base + ΔW; diffusers 0.42.1's `lora_state_dict` takes a diffusers output as is and the
transformer with that LoRA merged gives our DiT's output with the source LoRA. Breaks on a wrong fuse/split rule,
an alpha convention lost in a fold, a name a loader does not map, or a save that leaves partial files.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_lora
from lora_fixtures import Fmt, canonical_shapes, write_lora
from zimage_core import load_dit
from zimage_core.keymaps import Target
from zimage_core.lora import Adapter, AdapterKind, ApplyMode, LoraFile, LoraFormat, LoraPatch, apply_loras, read_lora
from zimage_core.lora.convert import ConvertedLora, TargetFormat, convert_lora, save_lora
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit, diffusers_forward, inputs, rel_err

BOUND = 1e-5
FOLD_BOUND = 1e-6
STRENGTH = 0.7
COMFY_ONLY = {Fmt.DORA, Fmt.COMFY_TRAINER}  # DoRA magnitudes, full diff / diff_b deltas: only ComfyUI's format
SVD_TO_DIFFUSERS = {Fmt.LOHA, Fmt.LOKR}


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return comfy_state_dict(diffusers_dit(seed=3).state_dict())


def read_fixture(fmt: Fmt, path, **kw):
    written = write_lora(fmt, path, **kw)
    return written, read_lora(written.path)


def dense(lora: LoraFile, base: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Canonical weight/bias key → ΔW at strength 1 (DoRA resolved against `base`), from the adapters alone."""
    out: dict[str, torch.Tensor] = {}
    for p in lora.patches:
        key = f"{p.target.module}.{'bias' if p.adapter.kind is AdapterKind.DIFF_BIAS else 'weight'}"
        n = p.adapter.out_features
        rows = slice(p.target.part * n, (p.target.part + 1) * n)
        delta = p.adapter.delta(dtype).reshape(base[key][rows].shape)
        if "dora_scale" in p.adapter.tensors:
            delta = p.adapter.apply_dora(base[key][rows].float(), delta) - base[key][rows].float()
        out.setdefault(key, torch.zeros(base[key].shape, dtype=dtype))[rows] += delta
    return out


def max_rel(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys()
    return max(((got[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)


def frobenius_rel(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys()
    return max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


def convert_and_reread(lora: LoraFile, to: TargetFormat, path, **kw) -> tuple[ConvertedLora, LoraFile]:
    converted = convert_lora(lora, to, **kw)
    save_lora(converted, path)
    back = read_lora(path)
    assert back.unmatched == (), back.unmatched
    return converted, back


# ------------------------------------------------------------------------------ every format × every target


@pytest.mark.parametrize("to", list(TargetFormat), ids=lambda t: t.value)
@pytest.mark.parametrize("fmt", list(Fmt), ids=lambda f: f.value)
def test_every_format_converts_to_the_same_delta(fmt, to, base, tmp_path):
    written, lora = read_fixture(fmt, tmp_path / "src.safetensors", seed=11)
    if fmt in COMFY_ONLY and to is not TargetFormat.COMFY:
        with pytest.raises(ValueError, match=r"(DoRA|diff).*convert to comfy"):
            convert_lora(lora, to)
        return
    converted, back = convert_and_reread(lora, to, tmp_path / f"out-{to.value}.safetensors")
    got = dense(back, base)
    if fmt in SVD_TO_DIFFUSERS and to is TargetFormat.DIFFUSERS:
        assert converted.svd_errors and len(converted.notes) == len(converted.svd_errors)
        err = frobenius_rel(dense(back, base, torch.float64), dense(lora, base, torch.float64))
        reported = max(converted.svd_errors.values())
        print(f"{fmt.value} → {to.value}: SVD error {err:.2e}, reported {reported:.2e}")
        assert err <= reported + FOLD_BOUND
        return
    assert converted.svd_errors == {} and converted.notes == []
    ref = dense(lora, base) if fmt is Fmt.DORA else written.deltas  # the fixture's own ΔW, independent of the core
    err = max_rel(got, ref)
    print(f"{fmt.value} → {to.value}: {len(converted.state_dict)} keys, rel err {err:.1e}")
    assert err <= BOUND
    meta = converted.metadata
    assert meta["zimage_source_format"] == lora.format.value and meta["zimage_converted_to"] == to.value
    assert meta["zimage_rank"] and "zimage_alpha" in meta
    assert read_lora(tmp_path / f"out-{to.value}.safetensors").metadata == meta


def test_musubi_metadata_and_rank_alpha_are_kept(base, tmp_path):
    written, lora = read_fixture(Fmt.MUSUBI, tmp_path / "m.safetensors", rank=8, alpha=2.0)
    for to in (TargetFormat.COMFY, TargetFormat.MUSUBI):
        converted, back = convert_and_reread(lora, to, tmp_path / f"{to.value}.safetensors")
        # comfy fuses q/k/v of rank 8 block-diagonally: rank 24, alpha 6 (scale unchanged); others keep 8 and 2
        assert back.ranks == ([8, 24] if to is TargetFormat.COMFY else [8])
        assert back.alphas == ([2.0, 6.0] if to is TargetFormat.COMFY else [2.0])
    assert converted.metadata["ss_network_dim"] == "8" and converted.metadata["ss_network_alpha"] == "2"
    assert all(v.dtype == torch.float32 and v.ndim == 0 for k, v in converted.state_dict.items() if k.endswith("alpha"))


def test_source_metadata_is_kept_but_not_a_stale_peft_config(tmp_path):
    written = write_lora(Fmt.MUSUBI, tmp_path / "m.safetensors")
    sd = load_file(written.path)
    save_file(sd, tmp_path / "meta.safetensors", metadata={"ss_output_name": "mine", "lora_adapter_metadata": "{}"})
    converted = convert_lora(read_lora(tmp_path / "meta.safetensors"), TargetFormat.DIFFUSERS)
    assert converted.metadata["ss_output_name"] == "mine" and "lora_adapter_metadata" not in converted.metadata


def test_lokr_rank_sets_the_svd_rank(base, tmp_path):
    _, lora = read_fixture(Fmt.LOKR, tmp_path / "k.safetensors")
    converted, back = convert_and_reread(lora, TargetFormat.DIFFUSERS, tmp_path / "k2.safetensors", lokr_rank=3)
    assert back.ranks == [3]
    err = frobenius_rel(dense(back, base, torch.float64), dense(lora, base, torch.float64))
    reported = max(converted.svd_errors.values())
    assert 0.01 < reported and err <= reported + FOLD_BOUND  # a visibly lossy rank, and an honest report


# ---------------------------------------------------------------------------------------------- round trips


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in sd.items()}


@pytest.mark.parametrize("fmt", [Fmt.MUSUBI, Fmt.MUSUBI_COMFY, Fmt.AI_TOOLKIT, Fmt.DIFFSYNTH, Fmt.DIFFUSION_PIPE,
                                 Fmt.PEFT_TRANSFORMER], ids=lambda f: f.value)
@pytest.mark.parametrize("via", [TargetFormat.COMFY, TargetFormat.DIFFUSERS], ids=lambda t: t.value)
def test_round_trip_keeps_the_delta(fmt, via, base, tmp_path):
    """X → via → X (X as the nearest target: musubi files back to musubi, PEFT files to diffusers, fused ones to
    comfy): the dense ΔW is bit-identical where no scale was folded, ≤ 1e-6 where one was."""
    _, lora = read_fixture(fmt, tmp_path / "src.safetensors", seed=4)
    home = {Fmt.MUSUBI: TargetFormat.MUSUBI, Fmt.MUSUBI_COMFY: TargetFormat.COMFY,
            Fmt.DIFFUSION_PIPE: TargetFormat.COMFY}.get(fmt, TargetFormat.DIFFUSERS)
    _, mid = convert_and_reread(lora, via, tmp_path / "mid.safetensors")
    _, back = convert_and_reread(mid, home, tmp_path / "back.safetensors")
    src, got = dense(lora, base), dense(back, base)
    folded = any(a is not None and a != r for p in lora.patches for a, r in [(p.adapter.alpha, p.adapter.rank)])
    if via is TargetFormat.DIFFUSERS and folded:
        assert max_rel(got, src) <= FOLD_BOUND
    else:
        assert got.keys() == src.keys() and all(torch.equal(got[k], src[k]) for k in src)


def test_split_and_fuse_give_back_the_same_tensors(tmp_path):
    """musubi (split q/k/v) → comfy (fused, block-diagonal) → musubi is the identity on every tensor; a fused
    ComfyUI-named LoRA (diffusion-pipe) → diffusers (split, shared down) → comfy gives back its lora_A/B exactly."""
    _, musubi = read_fixture(Fmt.MUSUBI, tmp_path / "m.safetensors", seed=2)
    again = convert_lora(read_and_convert(musubi, TargetFormat.COMFY, tmp_path), TargetFormat.MUSUBI).state_dict
    original = load_file(tmp_path / "m.safetensors")
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)

    _, pipe = read_fixture(Fmt.DIFFUSION_PIPE, tmp_path / "p.safetensors", seed=2)
    again = convert_lora(read_and_convert(pipe, TargetFormat.DIFFUSERS, tmp_path), TargetFormat.COMFY).state_dict
    original = _strip(load_file(tmp_path / "p.safetensors"), "diffusion_model.")
    renamed = {k.removeprefix("diffusion_model.").replace("lora_up", "lora_B").replace("lora_down", "lora_A"): v
               for k, v in again.items()}
    assert renamed.keys() == original.keys() and all(torch.equal(renamed[k], original[k]) for k in original)


def read_and_convert(lora: LoraFile, to: TargetFormat, tmp_path) -> LoraFile:
    return convert_and_reread(lora, to, tmp_path / f"via-{to.value}.safetensors")[1]


def test_partial_qkv_fuses_with_zero_rows(base, tmp_path):
    """Only to_q and to_v adapted, with different alphas: fused into qkv with each scale folded into its up
    block and zero rows for k; splitting again gives exactly q and v back, no k."""
    g = torch.Generator().manual_seed(0)
    dim, r = TINY["dim"], 4
    patches = []
    for part, name, alpha in ((0, "to_q", 1.0), (2, "to_v", 3.0)):
        t = {"down": torch.randn(r, dim, generator=g) / 16, "up": torch.randn(dim, r, generator=g) / 16,
             "alpha": torch.tensor(alpha)}
        patches.append(LoraPatch(f"layers.0.attention.{name}", Target("layers.0.attention.qkv", part, 3),
                                 Adapter(f"lora_unet_layers_0_attention_{name}", AdapterKind.LORA, t)))
    lora = LoraFile("partial", LoraFormat.MUSUBI, tuple(patches), ())
    _, fused = convert_and_reread(lora, TargetFormat.COMFY, tmp_path / "fused.safetensors")
    assert [p.target for p in fused.patches] == [Target("layers.0.attention.qkv")]
    delta = dense(fused, base)["layers.0.attention.qkv.weight"]
    assert not delta[dim:2 * dim].any() and max_rel(dense(fused, base), dense(lora, base)) <= FOLD_BOUND
    _, split = convert_and_reread(fused, TargetFormat.MUSUBI, tmp_path / "split.safetensors")
    assert sorted(p.module for p in split.patches) == ["layers.0.attention.to_q", "layers.0.attention.to_v"]
    assert split.ranks == [r] and max_rel(dense(split, base), dense(lora, base)) <= FOLD_BOUND


# -------------------------------------------------------------------------------------------- ComfyUI itself


@pytest.fixture(scope="module")
def comfy_key_map(base):
    return comfy_lora.key_map(base)


@pytest.mark.parametrize("fmt", list(Fmt), ids=lambda f: f.value)
def test_comfyui_loads_every_key_of_the_comfy_output(fmt, base, comfy_key_map, tmp_path):
    written, lora = read_fixture(fmt, tmp_path / "src.safetensors", seed=8)
    converted = convert_lora(lora, TargetFormat.COMFY)
    save_lora(converted, tmp_path / "comfy.safetensors")
    got, missing = comfy_lora.merged(load_file(tmp_path / "comfy.safetensors"), comfy_key_map, base, STRENGTH)
    assert missing == []
    expected = written.merged(base, STRENGTH, dora_norm="base" if fmt is Fmt.DORA else "adapted")
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed == set(written.deltas)
    assert max_rel({k: got[k] for k in changed}, {k: expected[k] for k in changed}) <= BOUND


def test_comfyui_loads_lora_diff_and_diff_b_on_one_module(base, comfy_key_map):
    """What the ComfyUI trainer writes (a LoRA, a bias diff and norm diffs), as separate patches per module."""
    g = torch.Generator().manual_seed(1)
    dim, r = TINY["dim"], 4
    lora_t = {"down": torch.randn(r, dim, generator=g) / 16, "up": torch.randn(4 * dim, r, generator=g) / 16,
              "alpha": torch.tensor(1.0)}
    patches = (
        LoraPatch("layers.0.adaLN_modulation.0", Target("layers.0.adaLN_modulation.0"),
                  Adapter("diffusion_model.layers.0.adaLN_modulation.0", AdapterKind.LORA, lora_t)),
        LoraPatch("layers.0.adaLN_modulation.0", Target("layers.0.adaLN_modulation.0"),
                  Adapter("diffusion_model.layers.0.adaLN_modulation.0", AdapterKind.DIFF_BIAS,
                          {"diff_b": 0.05 * torch.randn(4 * dim, generator=g)})),
        LoraPatch("layers.0.attention_norm1", Target("layers.0.attention_norm1"),
                  Adapter("diffusion_model.layers.0.attention_norm1", AdapterKind.DIFF,
                          {"diff": 0.05 * torch.randn(dim, generator=g)})),
    )
    lora = LoraFile("trainer", LoraFormat.COMFY, patches, ())
    sd = convert_lora(lora, TargetFormat.COMFY).state_dict
    assert set(sd) == {"diffusion_model.layers.0.adaLN_modulation.0." + leaf
                       for leaf in ("lora_up.weight", "lora_down.weight", "alpha", "diff_b")} | {
        "diffusion_model.layers.0.attention_norm1.diff"}
    got, missing = comfy_lora.merged(sd, comfy_key_map, base, 1.0)
    assert missing == []
    ref = dense(lora, base)
    assert max_rel({k: got[k] - base[k] for k in ref}, ref) <= BOUND
    for to in (TargetFormat.DIFFUSERS, TargetFormat.MUSUBI):
        with pytest.raises(ValueError, match=r"adaLN_modulation\.0: a full diff_b delta has no"):
            convert_lora(lora, to)


# ------------------------------------------------------------------------------------------- diffusers itself


@pytest.fixture(scope="module")
def dits(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    save_file(base, path)
    return diffusers_dit(seed=3), load_dit(path, "cpu", torch.float32)


def _diffusers_with(model, converted: dict[str, torch.Tensor]):
    """A copy of the diffusers transformer with each `transformer.<m>.lora_A/B` merged as PEFT does at scale 1
    (no alpha in the file → lora_alpha = r), checking that every module exists with the adapted shape."""
    import copy

    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in converted.items():
            if ".lora_A." not in key:
                continue
            name = key.removeprefix("transformer.").split(".lora_A.")[0]
            assert name in modules, f"{key}: diffusers' ZImageTransformer2DModel has no {name}"
            b = converted[key.replace(".lora_A.", ".lora_B.")]
            assert modules[name].weight.shape == (b.shape[0], a.shape[1]), key
            modules[name].weight += b.float() @ a.float()
    return model


def forward_with(dit, lora: LoraFile, x, t, caps) -> torch.Tensor:
    """Our DiT's output with `lora` applied at runtime (and removed again)."""
    with torch.no_grad():
        applied = apply_loras(dit, [(lora, 1.0)], ApplyMode.RUNTIME)
        try:
            return dit(x, t, caps)
        finally:
            applied.remove()


@pytest.mark.parametrize("fmt", [f for f in Fmt if f not in COMFY_ONLY], ids=lambda f: f.value)
def test_diffusers_takes_the_diffusers_output(fmt, dits, tmp_path):
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    reference, ours = dits
    _, lora = read_fixture(fmt, tmp_path / "src.safetensors", seed=9)
    converted = convert_lora(lora, TargetFormat.DIFFUSERS)
    save_lora(converted, tmp_path / "d.safetensors")
    as_read = ZImageLoraLoaderMixin.lora_state_dict(str(tmp_path / "d.safetensors"))
    assert as_read.keys() == converted.state_dict.keys()  # already diffusers' format: taken as is
    assert all(torch.equal(as_read[k], v) for k, v in converted.state_dict.items())
    x, t, caps = inputs(2, [7, 12], 8, 8)
    expected = diffusers_forward(_diffusers_with(reference, as_read), x, t, caps)
    got = forward_with(ours, lora, x, t, caps)
    err, moved = rel_err(got, expected), rel_err(diffusers_forward(reference, x, t, caps), expected)
    tol = 1e-4 if fmt not in SVD_TO_DIFFUSERS else 1e-4 + 2 * max(converted.svd_errors.values())
    print(f"{fmt.value}: diffusers + our output vs ours + the source: {err:.1e} (the LoRA moves it {moved:.1e})")
    assert moved > 1e-3 and err <= tol


def test_diffusers_load_lora_adapter_accepts_our_output(dits, tmp_path):
    reference, ours = dits
    _, lora = read_fixture(Fmt.MUSUBI, tmp_path / "src.safetensors", seed=9, alpha=2.0)
    converted = convert_lora(lora, TargetFormat.DIFFUSERS)
    model = diffusers_dit(seed=3)
    model.load_lora_adapter(converted.state_dict, prefix="transformer")
    x, t, caps = inputs(2, [7, 12], 8, 8)
    got = forward_with(ours, lora, x, t, caps)
    assert rel_err(got, diffusers_forward(model, x, t, caps)) <= 1e-4


# ------------------------------------------------------------------------------------------------ bad input


def test_unknown_target_format_is_refused(tmp_path):
    _, lora = read_fixture(Fmt.AI_TOOLKIT, tmp_path / "a.safetensors")
    assert [t.value for t in TargetFormat] == ["comfy", "diffusers", "musubi"]
    with pytest.raises(ValueError, match=r"unknown LoRA target format 'kohya'.*comfy"):
        convert_lora(lora, "kohya")
    with pytest.raises(ValueError, match="lokr_rank"):
        convert_lora(lora, TargetFormat.DIFFUSERS, lokr_rank=0)


def test_save_into_a_missing_folder_names_it(tmp_path):
    _, lora = read_fixture(Fmt.AI_TOOLKIT, tmp_path / "a.safetensors")
    target = tmp_path / "no" / "such" / "out.safetensors"
    with pytest.raises(FileNotFoundError, match=str(target.parent)):
        save_lora(convert_lora(lora, TargetFormat.COMFY), target)
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        save_lora(convert_lora(lora, TargetFormat.COMFY), tmp_path / "out.ckpt")


def test_a_failed_save_leaves_no_partial_file(tmp_path):
    _, lora = read_fixture(Fmt.AI_TOOLKIT, tmp_path / "a.safetensors")
    good = convert_lora(lora, TargetFormat.COMFY)
    path = tmp_path / "out.safetensors"
    save_lora(good, path)
    before = path.read_bytes()
    broken = ConvertedLora({"x": torch.zeros(2)}, {"not a string": 1})  # safetensors refuses non-str metadata
    with pytest.raises(TypeError, match="metadata"):
        save_lora(broken, path)
    with pytest.raises(TypeError, match="metadata"):
        save_lora(broken, tmp_path / "new.safetensors")
    assert path.read_bytes() == before, "a failed save must leave the old file untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "out.safetensors"]


def test_overlapping_adapters_on_one_module_are_refused(tmp_path):
    _, lora = read_fixture(Fmt.AI_TOOLKIT, tmp_path / "a.safetensors")
    q = next(p for p in lora.patches if p.module == "layers.0.attention.to_q")
    whole = LoraPatch("layers.0.attention.qkv", Target("layers.0.attention.qkv"),
                      Adapter("diffusion_model.layers.0.attention.qkv", AdapterKind.LORA,
                              {"down": q.adapter.tensors["down"], "up": torch.cat([q.adapter.tensors["up"]] * 3)}))
    doubled = LoraFile("doubled", lora.format, (q, whole), ())
    with pytest.raises(ValueError, match="overlaps another LoRA"):
        convert_lora(doubled, TargetFormat.COMFY)
    assert canonical_shapes()["layers.0.attention.qkv.weight"][0] == 3 * TINY["dim"]
