"""Text to image end to end, at parity with diffusers 0.42.1 `ZImagePipeline`, and the `generate` CLI.

Locks in: with tiny random DiT + Qwen3 + Flux VAE (the same weights on both sides, loaded by us from
real-layout files) and the same initial noise, our images equal diffusers' to 1e-4 (max abs on
[0, 1] pixels; fp32, CPU) for the Turbo preset (8 steps, guidance 0) and for guidance > 0 with a
negative prompt, normalisation and truncation (diffusers 0.42.1 turns CFG on for g > 0; we match
that threshold); exactly 8 DiT forwards for Turbo; the same seed gives bit-identical images; the CLI
writes PNGs whose metadata records the settings, and refuses bad input with one line and exit 2.
Breaks on any drift in the template, layer, schedule, CFG, noise, latent normalisation or decode.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import te_fixtures as tf
import vae_fixtures as vf
from zimage_core import cli
from zimage_core.checkpoint import load_dit
from zimage_core.pipeline import ImageSize, generate, repeat_each, sample
from zimage_core.png import read_png_text
from zimage_core.sampling import PRESETS, Preset, SamplerConfig
from zimage_core.text_encoder import load_text_encoder
from zimage_core.vae import load_vae
from zimage_fixtures import comfy_state_dict, diffusers_dit, rel_err

SIZE = ImageSize(64, 48)  # latent 6×8: 12 image tokens after 2×2 patches
PROMPTS = ("a cat", "the user")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    dit = diffusers_dit(seed=3)
    save_file(comfy_state_dict(dit.state_dict()), root / "dit.safetensors")
    te = tf.qwen3_model(seed=4)
    save_file(tf.hf_state_dict(te), root / "qwen3.safetensors")
    vae = vf.diffusers_vae(seed=5)
    vf.write_bfl(vae.state_dict(), root / "ae.safetensors")
    tokenizer = tf.write_tiny_tokenizer(root / "tokenizer")
    return {"root": root, "dit": root / "dit.safetensors", "te": root / "qwen3.safetensors",
            "vae": root / "ae.safetensors", "tokenizer": tokenizer, "ref": (dit, te, vae)}


@pytest.fixture(scope="module")
def ours(files):
    return (load_dit(files["dit"], dtype=torch.float32),
            load_text_encoder(files["te"], dtype=torch.float32, tokenizer=files["tokenizer"]),
            load_vae(files["vae"]))


@pytest.fixture(scope="module")
def reference(files, ours):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    dit, te, vae = files["ref"]
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=ours[1].tokenizer, transformer=dit)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, prompts, cfg: SamplerConfig, negative: str, noise: torch.Tensor, per_prompt: int = 1,
                  output: str = "pt"):
    if cfg.shift != pipe.scheduler.config.shift:
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=cfg.shift)
    with torch.no_grad():  # a copy: diffusers 0.42.1 writes the templated text back into the caller's list
        return pipe(list(prompts), height=SIZE.height, width=SIZE.width, num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance, cfg_normalization=cfg.cfg_normalization,
                    cfg_truncation=cfg.cfg_truncation, negative_prompt=[negative] * len(prompts),
                    num_images_per_prompt=per_prompt,
                    latents=noise, output_type=output).images


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def noise_for(seed: int, batch: int) -> torch.Tensor:
    from zimage_core.sampling import make_noise

    return make_noise(seed, SIZE.latent_shape(batch))


def test_turbo_equals_diffusers_and_runs_exactly_eight_forwards(ours, reference):
    """8 steps, g 0, shift 3, two prompts × 2 images: ≤ 1e-4 and 8 DiT calls (no negative encoded)."""
    dit, te, vae = ours
    calls = []
    hook = dit.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    encoded = []
    real_encode = te.encode
    te.encode = lambda prompts: encoded.append(list(prompts)) or real_encode(prompts)
    try:
        images = generate(dit, te, vae, PROMPTS, SIZE, seed=7, cfg=PRESETS[Preset.TURBO], images_per_prompt=2)
    finally:
        hook.remove()
        del te.encode
    assert calls == [4] * 8  # one batched forward per step, no CFG batch
    assert encoded == [list(PROMPTS)]  # the negative prompt is not encoded at g = 0
    expected = run_reference(reference, PROMPTS, PRESETS[Preset.TURBO], "", noise_for(7, 4), per_prompt=2)
    err = max_abs(images, expected)
    print(f"turbo: max |ours − diffusers| = {err:.2e} (images in [0, 1])")
    assert images.shape == (4, 3, SIZE.height, SIZE.width)
    assert err <= 1e-4
    clipped = float(((expected == 0) | (expected == 1)).float().mean())
    assert clipped < 0.2, f"{clipped:.0%} of the reference pixels are clipped: the comparison would be weak"
    # The latents before decoding, where nothing is clipped: rel ≤ 1e-5.
    reference.vae, real_vae = None, reference.vae
    try:
        ref_latents = run_reference(reference, PROMPTS, PRESETS[Preset.TURBO], "", noise_for(7, 4), 2, "latent")
    finally:
        reference.vae = real_vae
    with torch.inference_mode():
        latents = sample(dit, noise_for(7, 4), repeat_each(te.encode(PROMPTS), 2), PRESETS[Preset.TURBO])
    lat_err = rel_err(latents, ref_latents)
    print(f"turbo latents: max |ours − diffusers| / max |diffusers| = {lat_err:.2e}")
    assert lat_err <= 1e-5


@pytest.mark.parametrize("cfg", [
    SamplerConfig(steps=6, guidance=2.0, shift=3.0),
    SamplerConfig(steps=5, guidance=4.0, shift=6.0, cfg_normalization=1.0, cfg_truncation=0.5),
    SamplerConfig(steps=3, guidance=0.5, shift=3.0),  # 0 < g ≤ 1: CFG in diffusers 0.42.1 (not in ≤ 0.36)
], ids=["g2", "base-norm-trunc", "g0.5"])
def test_guidance_equals_diffusers(ours, reference, cfg):
    """CFG with a negative prompt: pred = pos + g·(pos − neg), normalisation and truncation as diffusers 0.42.1."""
    dit, te, vae = ours
    images = generate(dit, te, vae, PROMPTS, SIZE, seed=11, cfg=cfg, negative="blurry")
    expected = run_reference(reference, PROMPTS, cfg, "blurry", noise_for(11, 2))
    err = max_abs(images, expected)
    print(f"guidance {cfg.guidance}: max |ours − diffusers| = {err:.2e}")
    assert err <= 1e-4


def test_same_seed_is_bit_identical_and_seeds_differ(ours):
    """Two runs with one seed agree bit for bit on the CPU; another seed gives another image."""
    dit, te, vae = ours
    cfg = SamplerConfig(steps=2)
    a = generate(dit, te, vae, "a cat", SIZE, seed=1, cfg=cfg)
    b = generate(dit, te, vae, "a cat", SIZE, seed=1, cfg=cfg)
    c = generate(dit, te, vae, "a cat", SIZE, seed=2, cfg=cfg)
    assert torch.equal(a, b)
    assert max_abs(a, c) > 1e-3


def test_cli_generate_writes_pngs_with_settings(files, tmp_path, capsys):
    """`python -m zimage_core generate` with a batch of 2: NAME_1.png, NAME_2.png, settings in the metadata."""
    out = tmp_path / "cat.png"
    rc = cli.main(["generate", "--dit", str(files["dit"]), "--text-encoder", str(files["te"]), "--vae",
                   str(files["vae"]), "--tokenizer", str(files["tokenizer"]), "--prompt", "a cat", "--width", "64",
                   "--height", "48", "--seed", "5", "--batch", "2", "--steps", "2", "--out", str(out),
                   "--device", "cpu", "--dtype", "fp32"])
    assert rc == 0
    written = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in written] == ["cat_1.png", "cat_2.png"]
    meta = json.loads(read_png_text(written[1])["zimage"])
    assert meta | {"steps": 2, "guidance": 0.0, "shift": 3.0, "seed": 5, "index": 1, "preset": "turbo"} == meta
    assert "Seed: 5" in read_png_text(written[0])["parameters"]
    assert "sampling [" in capsys.readouterr().err  # the progress bar
    from PIL import Image

    assert np.asarray(Image.open(written[0])).shape == (48, 64, 3)


@pytest.mark.parametrize(("extra", "message"), [
    (["--width", "1000"], "width 1000: Z-Image needs a positive multiple of 16"),
    (["--steps", "0"], "need steps ≥ 1"),
    (["--preset", "turbo-xl"], None),
    (["--tokenizer", "/nonexistent/tokenizer"], "/nonexistent/tokenizer"),
])
def test_cli_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, extra, message):
    """Bad size, steps, preset or tokenizer: exit status 2 and one message naming the value, no traceback."""
    args = ["generate", "--dit", str(files["dit"]), "--text-encoder", str(files["te"]), "--vae", str(files["vae"]),
            "--tokenizer", str(files["tokenizer"]), "--prompt", "x", "--out", str(tmp_path / "x.png"),
            "--width", "64", "--height", "48", *extra]
    if message is None:  # argparse refuses it (exit 2, lists the choices)
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2 and "turbo" in capsys.readouterr().err
        return
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


def test_public_generate_is_the_function_even_after_the_cli_is_imported():
    """Breaks if a submodule named like a public function shadows it (`import zimage_core.cli` did once)."""
    import zimage_core
    import zimage_core.cli  # noqa: F401

    assert zimage_core.generate is generate
