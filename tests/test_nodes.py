"""The nodes' host conventions, in-process against ComfyUI 0.3.75's own modules (no server).

Locks in: ComfyUI's interrupt flag stops our sampler before the next DiT forward with ComfyUI's own
InterruptProcessingException (so the UI says "interrupted", not an error); the progress bar gets one
update per step; widget sentinels (steps 0, guidance −1, shift 0) mean "the preset's"; CONDITIONING
padding is dropped by its attention mask; LATENT ↔ model space uses ComfyUI's Flux latent format and
leaves an all-zero (empty) latent unshifted, as KSampler does; batch_index latents get KSampler's noise;
Z-Image LoRA's `normalise` bounds the whole chain's strengths and stays on for the nodes after it; file names
for the savers are plain names (no folders, no '..'); native VAEDecode of our LATENT equals ours in float.
Breaks if a host convention in nodes/_host.py drifts from ComfyUI's code.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import comfy_host
from zimage_core import PRESETS, Preset, SamplerConfig
from zimage_fixtures import comfy_state_dict, diffusers_dit

REPO = Path(__file__).resolve().parent.parent
PACK = "zimage_pack_under_test"  # not "comfyui_zimage": test_pack_import checks that name stays unimported


@pytest.fixture(scope="module")
def pack():
    comfy_host.import_comfy()
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == PACK or n.startswith(PACK + ".")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("nodes") / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=3).state_dict()), path)
    return path


@pytest.fixture(scope="module")
def dit(pack, dit_path):
    """The DiT as the loader node returns it: hosted in ComfyUI's model management."""
    return pack.nodes._hosting.host_dit(pack.zimage_core.load_dit(dit_path, "cpu", torch.float32))


def positive(length: int = 5, dim: int = 64) -> list:
    cap = torch.randn(1, length, dim, generator=torch.Generator().manual_seed(0))
    return [[cap, {"pooled_output": None, "attention_mask": torch.ones(1, length, dtype=torch.long)}]]


def run_sampler(pack, dit, **kw):
    args = dict(positive=positive(), latent={"samples": torch.zeros(1, 16, 4, 4)}, preset="turbo", seed=1, steps=3,
                guidance=0.0, shift=3.0, denoise=1.0) | kw
    return pack.nodes.sampling.ZImageSampler().sample(dit, **args)[0]


def test_interrupt_raises_comfyuis_exception_before_a_forward(pack, dit):
    import comfy.model_management as mm

    calls = []
    hook = dit.core.register_forward_hook(lambda *a: calls.append(1))
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_sampler(pack, dit)
    finally:
        mm.interrupt_current_processing(False)
        hook.remove()
    assert calls == []
    assert not mm.processing_interrupted()  # consumed, as ComfyUI's own check does


def test_progress_bar_gets_every_step(pack, dit):
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        out = run_sampler(pack, dit, steps=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert out["samples"].shape == (1, 16, 4, 4) and out["samples"].dtype == torch.float32


def test_widget_sentinels_mean_the_preset(pack):
    def config(*args):  # as a dict: the pack's copy of zimage_core has its own SamplerConfig class
        return asdict(pack.nodes._host.sampler_config(*args))

    assert config("base", 0, -1.0, 0.0) == asdict(PRESETS[Preset.BASE])
    assert config("turbo", 9, 0.5, 2.0) == asdict(SamplerConfig(steps=9, guidance=0.5, shift=2.0))
    with pytest.raises(ValueError):
        config("turbo-xl", 0, -1.0, 0.0)


def test_conditioning_padding_and_batch(pack):
    captions = pack.nodes._host.captions
    cond = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    caps = captions([[cond, {"attention_mask": mask}]], 2)
    assert [c.shape[0] for c in caps] == [4, 6] and torch.equal(caps[0], cond[0, :4])
    assert len(captions(positive(), 3)) == 3  # one prompt for a batch of 3 latents
    with pytest.raises(ValueError, match="one conditioning entry"):
        captions(positive() + positive(), 1)
    with pytest.raises(ValueError, match="does not match"):
        captions([[cond, {"attention_mask": mask}]], 3)


def test_latent_conventions_follow_comfyui(pack):
    import comfy.latent_formats
    import comfy.sample

    host = pack.nodes._host
    z = torch.randn(2, 16, 4, 6)
    assert torch.equal(host.latent_to_model(z), comfy.latent_formats.Flux().process_in(z))
    assert torch.allclose(host.latent_to_model(z), (z - 0.1159) * 0.3611)
    assert torch.allclose(host.model_to_latent(host.latent_to_model(z)), z, atol=1e-6)
    assert torch.equal(host.latent_to_model(torch.zeros(1, 16, 4, 4)), torch.zeros(1, 16, 4, 4))  # empty: unshifted
    with pytest.raises(ValueError, match="multiple of 16"):
        host.latent_to_model(torch.ones(1, 16, 4, 5))
    with pytest.raises(ValueError, match="noise mask"):
        host.sampler_input({"samples": z, "noise_mask": torch.ones(1, 1, 32, 48)})
    latent = {"samples": torch.zeros(3, 16, 4, 4)}
    assert torch.equal(host.noise(latent, 7), comfy.sample.prepare_noise(latent["samples"], 7))
    picked = {"samples": torch.zeros(2, 16, 4, 4), "batch_index": [2, 0]}
    assert torch.equal(host.noise(picked, 7), comfy.sample.prepare_noise(picked["samples"], 7, [2, 0]))


def zero_conditioning(cond: list) -> list:
    return [[torch.zeros_like(c), dict(extra)] for c, extra in cond]


def native_ksampler(model, seed: int, steps: int = 8, latent: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI's KSampler (comfy.sample.sample, euler / simple / cfg 1) on a MODEL; raw latent out."""
    import comfy.sample

    latent = torch.zeros(1, 16, 4, 4) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive(), zero_conditioning(positive()),
                               latent, denoise=1.0, disable_pbar=True, seed=seed)


def test_dit_as_native_model_equals_our_sampler_in_ksampler(pack, dit):
    """Z-Image DiT → MODEL into ComfyUI's own KSampler (euler, simple, 8 steps, cfg 1, the model's shift 3) gives our
    sampler's latent for the same seed. Tolerance 1e-4 rel: the same DiT runs the same 8 forwards; only the Euler
    arithmetic differs (ComfyUI steps through denoised = x + σ·v and d = (x − denoised)/σ, we step with v)."""
    model = pack.nodes.native.ZImageDiTToModel().convert(dit)[0]
    import comfy.model_sampling as ms

    assert isinstance(model.model.model_sampling, (ms.ModelSamplingDiscreteFlow, ms.CONST))
    assert model.model.model_sampling.shift == 3.0
    native = native_ksampler(model, seed=5)
    ours = run_sampler(pack, dit, seed=5, steps=8)["samples"]
    err = ((native - ours).norm() / ours.norm()).item()
    print(f"native KSampler vs Z-Image Sampler: rel err {err:.2e}")
    assert err <= 1e-4


def test_native_lora_patch_on_the_model_is_undone_for_our_sampler(pack, dit):
    """A LoRA applied by ComfyUI's own loader (comfy.sd.load_lora_for_models, ComfyUI key names) to the bridged MODEL
    changes KSampler's result; our sampler on the same DiT afterwards sees the base weights again (ComfyUI's model
    management unpatches), and the LoRA model gives its own result again after that."""
    import comfy.sd

    base_model = pack.nodes.native.ZImageDiTToModel().convert(dit)[0]
    g = torch.Generator().manual_seed(11)
    qkv = dit.core.layers[0].attention.qkv.weight
    lora = {"diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.randn(qkv.shape[0], 4, generator=g),
            "diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.randn(4, qkv.shape[1], generator=g),
            "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(4.0)}
    lora_model, _ = comfy.sd.load_lora_for_models(base_model, None, lora, 0.5, 0)
    assert len(lora_model.patches) == 1
    base_weight = qkv.detach().clone()
    base = run_sampler(pack, dit, seed=6, steps=4)["samples"]
    with_lora = native_ksampler(lora_model, seed=6, steps=4)
    assert not torch.equal(dit.core.layers[0].attention.qkv.weight, base_weight)  # patched in place while loaded
    assert ((with_lora - base).norm() / base.norm()).item() > 1e-3
    assert torch.equal(run_sampler(pack, dit, seed=6, steps=4)["samples"], base)
    assert torch.equal(dit.core.layers[0].attention.qkv.weight, base_weight)
    assert torch.allclose(native_ksampler(lora_model, seed=6, steps=4), with_lora, rtol=0, atol=1e-6)


def test_lora_node_applies_at_run_time_and_leaves_the_base_alone(pack, dit, dit_path, tmp_path):
    """Z-Image LoRA (a musubi file: kohya names, split q/k/v, alpha) on the hosted DiT: our sampler gives what the
    same DiT with the LoRA merged gives; the base DiT sampled afterwards is unchanged; the LoRA'd DiT handed to
    ComfyUI's KSampler gives our sampler's result (the object patches travel with the MODEL)."""
    import folder_paths

    g = torch.Generator().manual_seed(21)
    lora = {}
    for module, (rows, cols) in {"attention_to_q": (256, 256), "attention_to_v": (256, 256),
                                 "feed_forward_w1": (682, 256)}.items():
        lora[f"lora_unet_layers_0_{module}.lora_down.weight"] = torch.randn(4, cols, generator=g) * 0.2
        lora[f"lora_unet_layers_0_{module}.lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.2
        lora[f"lora_unet_layers_0_{module}.alpha"] = torch.tensor(4.0)
    save_file(lora, tmp_path / "style.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))

    base = run_sampler(pack, dit, seed=3, steps=4)["samples"]
    lora_dit, report = pack.nodes.lora.ZImageLoraLoader().apply(dit, "style.safetensors", 0.8)
    print(report)
    assert "3 modules matched, 0 keys unmatched" in report
    with_lora = run_sampler(pack, lora_dit, seed=3, steps=4)["samples"]
    assert torch.equal(run_sampler(pack, dit, seed=3, steps=4)["samples"], base)

    core = pack.zimage_core
    merged = pack.nodes._hosting.host_dit(core.load_dit(dit_path, "cpu", torch.float32))
    core.lora.apply_loras(merged.core, [(core.lora.read_lora(tmp_path / "style.safetensors"), 0.8)],
                          core.lora.ApplyMode.MERGED)
    expected = run_sampler(pack, merged, seed=3, steps=4)["samples"]
    assert ((with_lora - expected).norm() / expected.norm()).item() <= 1e-5
    assert ((with_lora - base).norm() / base.norm()).item() > 1e-3

    model = pack.nodes.native.ZImageDiTToModel().convert(lora_dit)[0]
    native = native_ksampler(model, seed=3, steps=4)
    assert ((native - with_lora).norm() / with_lora.norm()).item() <= 1e-4
    assert torch.equal(run_sampler(pack, dit, seed=3, steps=4)["samples"], base)


def test_lora_normalise_covers_the_whole_chain_and_stays_on(pack, dit, tmp_path):
    """Z-Image LoRA with normalise: the strengths of every LoRA in the chain so far are scaled to Σ|s| = 1 (ratios
    kept); a later node without it keeps the stack normalised (it cannot undo it); a chain without it is unchanged;
    the patcher's deltas use the applied strengths, the report shows them; an old workflow (no normalise) works."""
    import folder_paths

    from lora_fixtures import Fmt, write_lora

    for name, fmt, seed in (("a.safetensors", Fmt.MUSUBI, 1), ("b.safetensors", Fmt.AI_TOOLKIT, 2),
                            ("c.safetensors", Fmt.DIFFSYNTH, 3)):
        write_lora(fmt, tmp_path / name, seed=seed)
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    node = pack.nodes.lora.ZImageLoraLoader()
    plain, _ = node.apply(node.apply(dit, "a.safetensors", 0.8)[0], "b.safetensors", 0.6)
    assert not plain.normalise and [s for _, s in plain.applied_loras] == [0.8, 0.6]
    two, report = node.apply(node.apply(dit, "a.safetensors", 0.8)[0], "b.safetensors", 0.6, True)
    print(report)
    assert [s for _, s in two.loras] == [0.8, 0.6]  # as asked
    assert [s for _, s in two.applied_loras] == pytest.approx([0.8 / 1.4, 0.6 / 1.4])
    assert "normalised stack" in report and "a.safetensors (strength 0.5714" in report
    delta = two.patcher.object_patches["diffusion_model.layers.0.attention.qkv.delta"]
    assert delta.strengths == pytest.approx([0.8 / 1.4, 0.6 / 1.4])
    three, _ = node.apply(two, "c.safetensors", 0.6)  # normalise off here: the stack stays normalised
    assert three.normalise and [s for _, s in three.applied_loras] == pytest.approx([0.4, 0.3, 0.3])
    within, _ = node.apply(dit, "a.safetensors", 0.5, True)
    assert [s for _, s in within.applied_loras] == [0.5]  # already within the budget: unchanged


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "a\\b", "/abs", "", "  ", "c:x", "x..y"])
def test_saver_file_names_must_be_plain(pack, name):
    with pytest.raises(ValueError, match="plain file name"):
        pack.nodes.lora.plain_name(name)


def test_native_vae_decode_equals_ours_in_float(pack, tmp_path):
    """Our LATENT (ComfyUI's raw Flux latent) through native VAEDecode (comfy.sd.VAE from the same ae.safetensors)
    equals Z-Image VAE Decode before any uint8 rounding: ≤ 1e-4 rel (both fp32; only the conv implementations and
    ComfyUI's own latent shift/scale arithmetic differ, measured ~1e-6). The host test compares the saved PNGs."""
    import comfy.sd
    import comfy.utils

    import nodes as comfy_nodes
    import vae_fixtures as vf

    path = tmp_path / "ae.safetensors"
    vf.write_bfl(vf.diffusers_vae(seed=5, ch=128).state_dict(), path)
    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))}
    native_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)), dtype=torch.float32)
    native = comfy_nodes.VAEDecode().decode(native_vae, latent)[0]
    vae = pack.zimage_core.load_vae(path, "cpu", torch.float32)
    hosted = pack.nodes._hosting.host_module(vae, vae, torch.device("cpu"), torch.device("cpu"))  # as the loader
    ours = pack.nodes.sampling.ZImageVAEDecode().decode(hosted, latent)[0]
    err = ((native - ours).abs().max() / ours.abs().max()).item()
    print(f"native VAEDecode vs ZImageVAEDecode, float IMAGE: rel err {err:.2e}")
    assert native.shape == ours.shape == (1, 64, 64, 3)
    assert err <= 1e-4
