"""Locks in `python -m zimage_core inspect` / `zimage_core.inspection.inspect`: what it says about each real layout.

Tiny files with the real key names, written here: the DiT (diffusers shards, ComfyUI, ComfyUI under
`model.diffusion_model.`, scaled fp8, comfy_quant fp8), a Qwen3 text encoder from `transformers` (one
file under `model.`, bare, under the all-in-one `text_encoders.qwen3_4b.transformer.` prefix, and 2
shards + index), the Flux-type VAE from diffusers' `AutoencoderKL` in diffusers and BFL names (the BFL
renaming is written here from ZIMAGE_SPEC §4 and checked against the real manifests), LoRAs in the
musubi/kohya, AI Toolkit PEFT, DiffSynth PEFT `.default`, ComfyUI fused-qkv, LoKr and LoHa styles,
foreign models and a diffusers model root. Each test asserts kind, layout, dtypes, parameters and the
inferred config against values computed independently of the core.

What breaks these: a layout or quant format misdetected or renamed in the report, a config field
inferred from the wrong shape, scale/marker tensors or LoRA alphas counted as parameters, a foreign
model raising instead of being named, tensor data read where headers suffice, or the CLI not printing
plain JSON.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zimage_fixtures as zf
from zimage_core.inspection import inspect, text_encoder_config, vae_config

REPO = Path(__file__).resolve().parent.parent
DIM, FFN, N_LAYERS = 256, 682, 2  # zimage_fixtures.TINY; FFN = int(256 / 3 * 8) as diffusers builds it
RANK = 4
TINY_DIT_CONFIG = dict(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, cap_feat_dim=64, ffn_dim=682,
                       t_embed_dim=1024, adaln_dim=256, in_channels=16, patch_size=2, f_patch_size=1, freq_dim=256,
                       axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, t_scale=1000.0,
                       norm_eps=1e-5, seq_multiple=32)
TINY_TE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
               intermediate_size=128, vocab_size=1000)


def run_cli(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "zimage_core", "inspect", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- DiT ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit(tmp_path_factory) -> tuple[Path, int]:
    """A folder of tiny DiT files, and the parameter count of the diffusers model they came from."""
    model = zf.diffusers_dit(seed=0)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("dit")
    zf.write_sharded(sd, folder / "root")
    comfy = zf.comfy_state_dict(sd)
    save_file(comfy, folder / "comfy.safetensors")
    save_file({f"model.diffusion_model.{k}": v.bfloat16() for k, v in comfy.items()}, folder / "prefixed.safetensors")
    save_file(zf.scaled_fp8_state_dict(comfy), folder / "scaled_fp8.safetensors")
    save_file(zf.comfy_quant_state_dict(comfy), folder / "comfy_quant.safetensors")
    return folder, sum(p.numel() for p in model.parameters())


def test_dit_diffusers_shards(dit, reads):
    folder, n_params = dit
    shards = sorted((folder / "root" / "transformer").glob("*.safetensors"))
    for given in (folder / "root" / "transformer", shards[0]):
        r = inspect(given)
        assert (r["kind"], r["layout"], r["quant"], r["prefix"]) == ("zimage_dit", "diffusers", "none", "")
        assert r["files"] == [str(s) for s in shards]
        assert r["dtypes"] == {"float32": 101}  # 90 ComfyUI tensors + k and v split out of 6 fused qkv - norm_final
        assert r["parameters"] == n_params
        assert json.loads(json.dumps(r["config"])) == TINY_DIT_CONFIG
    assert reads == []  # headers only


def test_dit_comfy_with_and_without_prefix(dit, reads):
    folder, n_params = dit
    r = inspect(folder / "comfy.safetensors")
    assert (r["kind"], r["layout"], r["quant"], r["prefix"]) == ("zimage_dit", "comfy", "none", "")
    assert r["dtypes"] == {"float32": 90}
    assert r["parameters"] == n_params + DIM  # + the unused Lumina-2 leftover norm_final.weight [dim]
    assert r["ignored_keys"] == ["norm_final.weight"]
    assert json.loads(json.dumps(r["config"])) == TINY_DIT_CONFIG
    assert reads == []

    r = run_cli(folder / "prefixed.safetensors")
    assert (r["kind"], r["layout"], r["quant"]) == ("zimage_dit", "comfy", "none")
    assert r["prefix"] == "model.diffusion_model."
    assert r["dtypes"] == {"bfloat16": 90}
    assert r["parameters"] == n_params + DIM
    assert r["config"] == TINY_DIT_CONFIG


def test_dit_fp8(dit, reads):
    folder, n_params = dit
    n_fp8 = 6 * 5  # 6 blocks (2 layers + 2 + 2 refiners) × qkv, out, w1, w2, w3
    r = inspect(folder / "scaled_fp8.safetensors")
    assert (r["layout"], r["quant"]) == ("comfy", "scaled_fp8")
    # fp8 weights + the 2-element marker; float32: the other 60 tensors + scale_weight and scale_input per fp8 weight
    assert r["dtypes"] == {"float32": 90 - n_fp8 + 2 * n_fp8, "float8_e4m3fn": n_fp8 + 1}
    assert r["parameters"] == n_params + DIM  # scales and marker excluded
    assert json.loads(json.dumps(r["config"])) == TINY_DIT_CONFIG
    assert reads == []

    r = inspect(folder / "comfy_quant.safetensors")
    assert (r["layout"], r["quant"]) == ("comfy", "comfy_quant")
    assert r["dtypes"] == {"float32": 90, "float8_e4m3fn": n_fp8, "uint8": n_fp8}  # weight_scale fp32, JSON blobs u8
    assert r["parameters"] == n_params + DIM
    assert {i.dtype for i in reads} == {torch.uint8} and sum(i.numel for i in reads) < 100 * n_fp8  # blobs only


# --- text encoder ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> tuple[Path, int]:
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(**TINY_TE))
    sd = {f"model.{k}": v.bfloat16().contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("te")
    save_file(sd, folder / "qwen_3_4b.safetensors")
    save_file({k.removeprefix("model."): v for k, v in sd.items()}, folder / "bare.safetensors")
    save_file({f"text_encoders.qwen3_4b.transformer.{k}": v for k, v in sd.items()}, folder / "aio.safetensors")
    shards = folder / "text_encoder"
    shards.mkdir()
    keys = sorted(sd)
    weight_map = {k: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for name in sorted(set(weight_map.values())):
        save_file({k: sd[k] for k in keys if weight_map[k] == name}, shards / name)
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, layout, prefix", [
    ("qwen_3_4b.safetensors", "hf", "model."),
    ("bare.safetensors", "hf_no_prefix", ""),
    ("aio.safetensors", "comfy_checkpoint", "text_encoders.qwen3_4b.transformer.model."),
    ("text_encoder", "hf", "model."),
    ("text_encoder/model-00002-of-00002.safetensors", "hf", "model."),
])  # fmt: skip
def test_text_encoder(text_encoder, reads, name, layout, prefix):
    folder, n_params = text_encoder
    r = inspect(folder / name)
    assert (r["kind"], r["layout"], r["prefix"], r["quant"]) == ("text_encoder", layout, prefix, "none")
    assert len(r["files"]) == (2 if name.startswith("text_encoder") else 1)
    assert r["dtypes"] == {"bfloat16": 3 * 11 + 2}  # q k v o q_norm k_norm gate up down 2 norms; embed, norm
    assert r["parameters"] == n_params
    assert r["config"] == {**TINY_TE, "lm_head": False}
    assert reads == []


def test_text_encoder_config_of_the_real_qwen3_4b():
    real = zf.manifest("keys_te_qwen3_4b_comfy.txt")
    shapes = {k.removeprefix("model."): v for k, v in real.items()}
    assert text_encoder_config(shapes) == dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                                               num_key_value_heads=8, head_dim=128, intermediate_size=9728,
                                               vocab_size=151936)


# --- VAE ---------------------------------------------------------------------------------------------

_BFL_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def bfl_vae(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL names → BFL/ldm names (`ae.safetensors`, ComfyUI), ZIMAGE_SPEC §4."""
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{_BFL_ATTN[m[2]]}."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if ".attn_1." in key and key.endswith(".weight") and not key.endswith("norm.weight"):
            value = value.reshape(*value.shape, 1, 1)  # BFL attention projections are 1×1 convs
        out[key] = value
    return out


def test_bfl_renaming_turns_the_real_diffusers_vae_into_the_real_comfy_vae():
    diffusers = {k: torch.empty(s, device="meta") for k, s in zf.manifest("keys_vae_flux_diffusers.txt").items()}
    renamed = {k: tuple(v.shape) for k, v in bfl_vae(diffusers, levels=4).items()}
    assert renamed == zf.manifest("keys_vae_flux_comfy.txt")


@pytest.mark.parametrize("name", ["keys_vae_flux_comfy.txt", "keys_vae_flux_diffusers.txt"])
def test_vae_config_of_the_real_flux_vae(name):
    assert vae_config(zf.manifest(name)) == dict(latent_channels=16, block_out_channels=[128, 256, 512, 512],
                                              layers_per_block=2, in_channels=3, out_channels=3, encoder=True,
                                              decoder=True, quant_conv=False)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> tuple[Path, int]:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=2,
                          latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("vae")
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in bfl_vae(sd, levels=2).items()}, folder / "ae.safetensors")
    return folder, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, layout", [
    ("diffusion_pytorch_model.safetensors", "diffusers"), ("ae.safetensors", "bfl"),
])  # fmt: skip
def test_vae(vae, reads, name, layout):
    folder, n_params = vae
    r = inspect(folder / name)
    assert (r["kind"], r["layout"], r["quant"]) == ("vae", layout, "none")
    assert list(r["dtypes"]) == ["float32"]
    assert r["parameters"] == n_params
    assert r["config"] == dict(latent_channels=16, block_out_channels=[32, 64], layers_per_block=2, in_channels=3,
                               out_channels=3, encoder=True, decoder=True, quant_conv=False)
    assert reads == []


# --- LoRA --------------------------------------------------------------------------------------------

ATTN = {"to_q": (DIM, DIM), "to_k": (DIM, DIM), "to_v": (DIM, DIM), "to_out.0": (DIM, DIM)}  # (out, in)
FFN_SHAPES = {"w1": (FFN, DIM), "w2": (DIM, FFN), "w3": (FFN, DIM)}


def lora_pair(out_in: tuple[int, int], rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, in], up [out, rank]) in bf16, as trainers save them."""
    out_features, in_features = out_in
    return (torch.randn(rank, in_features, generator=g).bfloat16(),
            torch.randn(out_features, rank, generator=g).bfloat16())


def musubi_lora(g: torch.Generator) -> dict:
    """musubi-tuner `networks.lora_zimage`: kohya names of the diffusers modules, alpha 1."""
    sd = {}
    for i in range(N_LAYERS):
        for name, shape in {**{f"attention.{k}": v for k, v in ATTN.items()},
                            **{f"feed_forward.{k}": v for k, v in FFN_SHAPES.items()}}.items():
            stem = f"lora_unet_layers_{i}_{name.replace('.', '_')}"
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = lora_pair(shape, RANK, g)
            sd[f"{stem}.alpha"] = torch.tensor(1.0)
    return sd


def ai_toolkit_lora(g: torch.Generator) -> dict:
    """AI Toolkit PEFT style: `diffusion_model.` + diffusers names, lora_A/lora_B, no alpha, adaLN included."""
    sd = {}
    for i in range(N_LAYERS):
        shapes = {**{f"attention.{k}": v for k, v in ATTN.items()},
                  **{f"feed_forward.{k}": v for k, v in FFN_SHAPES.items()}, "adaLN_modulation.0": (4 * DIM, DIM)}
        for name, shape in shapes.items():
            stem = f"diffusion_model.layers.{i}.{name}"
            sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = lora_pair(shape, RANK, g)
    return sd


def comfy_trainer_lora(g: torch.Generator) -> dict:
    """ComfyUI TrainLoraNode style: native fused names, lora_up/lora_down + alpha, refiners, embedders, diffs."""
    blocks = [f"layers.{i}" for i in range(N_LAYERS)] + ["noise_refiner.0", "context_refiner.0"]
    shapes = {f"{b}.{n}": s for b in blocks for n, s in
              {"attention.qkv": (3 * DIM, DIM), "attention.out": (DIM, DIM),
               **{f"feed_forward.{k}": v for k, v in FFN_SHAPES.items()}}.items()}
    shapes.update({"x_embedder": (DIM, 64), "cap_embedder.1": (DIM, 64)})
    sd = {}
    for name, shape in shapes.items():
        stem = f"diffusion_model.{name}"
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = lora_pair(shape, 8, g)
        sd[f"{stem}.alpha"] = torch.tensor(1.0)
    sd["diffusion_model.layers.0.attention_norm1.diff"] = torch.randn(DIM, generator=g)
    sd["diffusion_model.x_embedder.diff_b"] = torch.randn(DIM, generator=g)
    return sd


def lokr_lora(g: torch.Generator) -> dict:
    """LyCORIS LoKr under ComfyUI's `lycoris_` + underscored diffusers names: W = kron(w1, w2_a @ w2_b)."""
    sd = {}
    for q in ("to_q", "to_k", "to_v"):
        stem = f"lycoris_layers_0_attention_{q}"
        sd[f"{stem}.lokr_w1"] = torch.randn(4, 4, generator=g)
        sd[f"{stem}.lokr_w2_a"] = torch.randn(DIM // 4, 2, generator=g)
        sd[f"{stem}.lokr_w2_b"] = torch.randn(2, DIM // 4, generator=g)
        sd[f"{stem}.alpha"] = torch.tensor(2.0)
    return sd


def loha_lora(g: torch.Generator) -> dict:
    """LyCORIS LoHa with kohya names: W = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)."""
    sd = {}
    for w in ("w1", "w2", "w3"):
        stem = f"lora_unet_layers_1_feed_forward_{w}"
        out_features, in_features = FFN_SHAPES[w]
        for n in ("1", "2"):
            sd[f"{stem}.hada_w{n}_a"] = torch.randn(out_features, 3, generator=g)
            sd[f"{stem}.hada_w{n}_b"] = torch.randn(3, in_features, generator=g)
        sd[f"{stem}.alpha"] = torch.tensor(3.0)
    return sd


def diffsynth_lora(g: torch.Generator) -> dict:
    """DiffSynth-Studio PEFT: bare diffusers names with `.default`, refiners included."""
    sd = {}
    for block in ("layers.0", "noise_refiner.1"):
        for name, shape in ATTN.items():
            stem = f"{block}.attention.{name}"
            sd[f"{stem}.lora_A.default.weight"], sd[f"{stem}.lora_B.default.weight"] = lora_pair(shape, 32, g)
    return sd


def _lora_params(sd: dict) -> int:
    return sum(v.numel() for k, v in sd.items() if not k.endswith(".alpha"))


LORAS = {  # name: (writer, layout, expected config subset)
    "musubi": (musubi_lora, "kohya", dict(algorithm="lora", naming="kohya", prefix="lora_unet_", peft_default=False,
                                          attention="split_qkv", ranks=[RANK], alpha=True, alphas=[1.0], modules=14,
                                          layers=2, targets={"attention": 8, "feed_forward": 6}, diff=0, diff_b=0)),
    "ai_toolkit": (ai_toolkit_lora, "peft", dict(algorithm="lora", naming="dotted", prefix="diffusion_model.",
                                                 peft_default=False, attention="split_qkv", ranks=[RANK], alpha=False,
                                                 alphas=[], modules=16, layers=2,
                                                 targets={"adaLN": 2, "attention": 8, "feed_forward": 6})),
    "comfy_trainer": (comfy_trainer_lora, "comfy", dict(
        algorithm="lora", naming="dotted", prefix="diffusion_model.", attention="fused_qkv", ranks=[8], alpha=True,
        alphas=[1.0], modules=22, layers=2, targets={"attention": 4, "embedders": 2, "feed_forward": 6, "refiners": 10},
        diff=1, diff_b=1)),
    "lokr": (lokr_lora, "lokr", dict(algorithm="lokr", naming="kohya", prefix="lycoris_", attention="split_qkv",
                                     ranks=[2], alpha=True, alphas=[2.0], modules=3, targets={"attention": 3})),
    "loha": (loha_lora, "loha", dict(algorithm="loha", naming="kohya", prefix="lora_unet_", attention="none", ranks=[3],
                                     alphas=[3.0], modules=3, layers=1, targets={"feed_forward": 3})),
    "diffsynth": (diffsynth_lora, "peft", dict(prefix="", peft_default=True, attention="split_qkv", ranks=[32],
                                               alpha=False, modules=8, layers=1,
                                               targets={"attention": 4, "refiners": 4})),
}


@pytest.mark.parametrize("name", list(LORAS))
def test_lora(tmp_path, reads, name):
    writer, layout, expected = LORAS[name]
    sd = writer(torch.Generator().manual_seed(0))
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, path)
    r = run_cli(path) if name == "musubi" else inspect(path)
    assert (r["kind"], r["layout"]) == ("lora", layout)
    assert r["dtypes"] == dict(Counter(str(v.dtype).removeprefix("torch.") for v in sd.values()))
    assert r["parameters"] == _lora_params(sd)
    assert {k: r["config"][k] for k in expected} == expected
    assert r["config"]["unrecognised_keys"] == 0
    if name != "musubi":
        assert all(i.numel == 1 for i in reads)  # alpha scalars only


# --- foreign, unknown, model root --------------------------------------------------------------------

FOREIGN = {
    "flux_dit": {"double_blocks.0.img_attn.qkv.weight": [12, 4], "double_blocks.0.img_mlp.0.weight": [16, 4],
                 "single_blocks.0.linear1.weight": [28, 4], "img_in.weight": [4, 8], "time_in.in_layer.weight": [4, 8]},
    "sdxl_unet": {"model.diffusion_model.input_blocks.0.0.weight": [8, 4, 3, 3],
                  "model.diffusion_model.time_embed.0.weight": [16, 8],
                  "model.diffusion_model.out.2.weight": [4, 8, 3, 3]},
    "lumina2_dit": {"cap_embedder.1.weight": [8, 4], "x_embedder.weight": [8, 16],
                    "layers.0.adaLN_modulation.1.weight": [32, 8], "layers.0.attention.qkv.weight": [24, 8]},
    "unknown": {"encoder.block.0.layer.0.SelfAttention.q.weight": [8, 8], "shared.weight": [10, 8]},
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_and_unknown_models_are_named_not_refused(tmp_path, reads, kind):
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in FOREIGN[kind].items()}, path)
    r = inspect(path)
    assert (r["kind"], r["layout"], r["config"]) == (kind, None, None)
    assert r["dtypes"] == {"float16": len(FOREIGN[kind])}
    assert r["parameters"] == sum(torch.Size(s).numel() for s in FOREIGN[kind].values())
    assert ("sample_keys" in r) == (kind == "unknown")
    assert reads == []


def test_model_root_reports_each_component(tmp_path, dit, text_encoder, vae):
    root = tmp_path / "Z-Image-Turbo"
    shutil.copytree(dit[0] / "root" / "transformer", root / "transformer")  # 3 shards + index
    shutil.copytree(text_encoder[0] / "text_encoder", root / "text_encoder")  # 2 shards + index
    (root / "vae").mkdir()
    shutil.copy(vae[0] / "diffusion_pytorch_model.safetensors", root / "vae")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline",
                                                       "vae": ["diffusers", "AutoencoderKL"]}))

    r = run_cli(root)
    assert (r["kind"], r["pipeline"]) == ("model_folder", "ZImagePipeline")
    assert list(r["components"]) == ["transformer", "text_encoder", "vae"]  # tokenizer/ holds no weights
    parts = r["components"]
    assert [(p["kind"], p["layout"], len(p["files"])) for p in parts.values()] == [
        ("zimage_dit", "diffusers", 3), ("text_encoder", "hf", 2), ("vae", "diffusers", 1)]
    assert parts["transformer"]["config"] == TINY_DIT_CONFIG
    assert parts["text_encoder"]["config"] == {**TINY_TE, "lm_head": False}
    assert parts["vae"]["config"]["block_out_channels"] == [32, 64]


def test_comfy_all_in_one_checkpoint(tmp_path, dit, text_encoder, vae, reads):
    """ComfyUI's CheckpointLoaderSimple layout for Z-Image: model.diffusion_model., text_encoders.qwen3_4b., vae."""
    parts = {"model.diffusion_model.": load_file(dit[0] / "scaled_fp8.safetensors"),
             "text_encoders.qwen3_4b.transformer.": load_file(text_encoder[0] / "qwen_3_4b.safetensors"),
             "vae.": load_file(vae[0] / "ae.safetensors")}
    sd = {prefix + k: v for prefix, part in parts.items() for k, v in part.items()}
    sd["scaled_fp8"] = sd.pop("model.diffusion_model.scaled_fp8")  # the marker may sit at the top level
    path = tmp_path / "z_image_turbo_aio_fp8.safetensors"
    save_file(sd, path)

    r = inspect(path)
    assert r["kind"] == "checkpoint" and r["other_keys"] == 0
    parts = r["components"]
    assert list(parts) == ["diffusion_model", "text_encoder", "vae"]
    assert [(p["kind"], p["layout"]) for p in parts.values()] == [
        ("zimage_dit", "comfy"), ("text_encoder", "comfy_checkpoint"), ("vae", "bfl")]
    dit_part = parts["diffusion_model"]
    assert (dit_part["quant"], dit_part["prefix"], dit_part["parameters"]) == (
        "scaled_fp8", "model.diffusion_model.", dit[1] + DIM)
    assert parts["text_encoder"]["config"] == {**TINY_TE, "lm_head": False}
    assert parts["vae"]["config"]["block_out_channels"] == [32, 64]
    assert r["parameters"] == dit[1] + DIM + text_encoder[1] + vae[1]
    assert r["dtypes"] == dict(Counter(str(v.dtype).removeprefix("torch.") for v in sd.values()))
    assert reads == []


def test_inspect_is_exported_by_the_package():
    import zimage_core

    assert zimage_core.inspect is importlib.import_module("zimage_core.inspection").inspect is inspect
