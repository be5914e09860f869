"""Locks in what bad input does: ONE clear error naming the file and the problem, and nothing half-loaded.

Cases: a truncated shard, a shard missing from an index (or from an index-less shard set), an index
whose weight_map leaves its folder, a Flux / SDXL / Lumina-2 / LoRA / VAE file given to `load_dit`,
pickle files (under `.pt` and under `.safetensors`: never unpickled, proved by a trap object that
writes a marker file when unpickled), random bytes, an empty file, a ComfyUI file with one wrong shape,
a missing key or an unexpected key (also a diffusers shard set missing one of q/k/v), and an
`nvfp4` comfy_quant file. Each must raise ValueError or FileNotFoundError whose one-line message holds
the file name and the specific key/shard/problem; when the problem shows in the headers, no tensor
data may have been read (every read goes through `safetensors_file.read_into`, spied on here). The
CLI turns the same errors into exit status 2 with one line on stderr and no traceback.

What breaks these: a loader that reads tensors before validating, trusts an index's paths, opens
pickle, or lets a KeyError/struct.error/traceback escape instead of naming the file and problem.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zimage_fixtures as zf
from zimage_core import cli, load_dit
from zimage_core.inspection import inspect

REPO = Path(__file__).resolve().parent.parent
SHARD = "diffusion_pytorch_model-{i:05d}-of-00003.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def dit_sd() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in zf.diffusers_dit(seed=0).state_dict().items()}


@pytest.fixture
def comfy_sd(dit_sd) -> dict[str, torch.Tensor]:
    return zf.comfy_state_dict(dit_sd)


@pytest.fixture
def sharded(tmp_path, dit_sd) -> Path:
    """A diffusers model root: tmp/model/transformer/{3 shards, index}."""
    return zf.write_sharded(dit_sd, tmp_path / "model")


def error_of(call, exc_type: type[Exception], *parts: str) -> str:
    """The message `call()` raises, checked to be one line of type `exc_type` holding every part."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --- shards and indexes ------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["tail", "header"])
def test_truncated_shard(sharded, reads, cut):
    shard = sharded / "transformer" / SHARD.format(i=2)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if cut == "tail" else data[:50])
    problem = "truncated file" if cut == "tail" else "not a safetensors file"
    error_of(lambda: load_dit(sharded), ValueError, shard.name, problem)
    error_of(lambda: inspect(sharded / "transformer"), ValueError, shard.name, problem)
    assert reads == []


@pytest.mark.parametrize("given", ["root", "index", "first_shard", "first_shard_without_index"])
def test_missing_shard(sharded, reads, given):
    tdir = sharded / "transformer"
    (tdir / SHARD.format(i=3)).unlink()
    if given == "first_shard_without_index":
        (tdir / INDEX).unlink()
    path = {"root": sharded, "index": tdir / INDEX}.get(given, tdir / SHARD.format(i=1))
    error_of(lambda: load_dit(path), FileNotFoundError, SHARD.format(i=3), "missing")
    assert reads == []


@pytest.mark.parametrize("outside", ["../x.safetensors", "ABSOLUTE", "sub/x.safetensors"])
def test_index_naming_a_file_outside_its_folder(sharded, reads, outside):
    tdir = sharded / "transformer"
    target = tdir.parent.parent / "x.safetensors" if outside == "ABSOLUTE" else tdir / outside
    outside = str(target) if outside == "ABSOLUTE" else outside
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tdir / SHARD.format(i=3), target)  # the file exists: it is refused for where it is
    index = json.loads((tdir / INDEX).read_text())
    index["weight_map"] = {k: outside if v == SHARD.format(i=3) else v for k, v in index["weight_map"].items()}
    (tdir / INDEX).write_text(json.dumps(index))
    error_of(lambda: load_dit(sharded), ValueError, INDEX, repr(outside), "outside the index's folder")
    assert reads == []


# --- the wrong kind of model -------------------------------------------------------------------------

FLUX = {"double_blocks.0.img_attn.qkv.weight": [12, 4], "double_blocks.0.img_mlp.0.weight": [16, 4],
        "single_blocks.0.linear1.weight": [28, 4], "img_in.weight": [4, 8]}
SDXL = {"model.diffusion_model.input_blocks.0.0.weight": [8, 4, 3, 3],
        "model.diffusion_model.time_embed.0.weight": [16, 8], "model.diffusion_model.out.2.weight": [4, 8, 3, 3]}
MUSUBI_LORA = {"lora_unet_layers_0_attention_to_q.lora_down.weight": [4, 256],
               "lora_unet_layers_0_attention_to_q.lora_up.weight": [256, 4],
               "lora_unet_layers_0_attention_to_q.alpha": []}
VAE = {"encoder.conv_in.weight": [32, 3, 3, 3], "decoder.conv_in.weight": [64, 16, 3, 3]}


def lumina2(comfy_sd: dict) -> dict:
    """Z-Image-like, but the blocks modulate through `adaLN_modulation.1` (SiLU + Linear), as Lumina-2 does."""
    blocks = ("layers.", "noise_refiner.")
    return {k.replace(".adaLN_modulation.0.", ".adaLN_modulation.1.") if k.startswith(blocks) else k: v
            for k, v in comfy_sd.items()}


@pytest.mark.parametrize("kind, says", [
    ("flux", "a Flux transformer"), ("sdxl", "an SD/SDXL UNet"), ("lumina2", "a Lumina-2 DiT"),
    ("lora", "a LoRA"), ("vae", "a VAE"),
])  # fmt: skip
def test_other_models_given_as_a_zimage_dit(tmp_path, comfy_sd, reads, kind, says):
    keys = {"flux": FLUX, "sdxl": SDXL, "lora": MUSUBI_LORA, "vae": VAE}
    sd = lumina2(comfy_sd) if kind == "lumina2" else {k: torch.zeros(s) for k, s in keys[kind].items()}
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, path)
    error_of(lambda: load_dit(path), ValueError, path.name, says, "not a Z-Image DiT")
    assert reads == []


# --- not safetensors ---------------------------------------------------------------------------------


class Trap:
    """Pickles fine; unpickling it creates `marker` (through `open`), which proves the file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("name, problem", [
    ("model.pt", "a pickle checkpoint (.pt)"),
    ("model.safetensors", "not a safetensors file (a PyTorch zip/pickle checkpoint"),
    ("raw_pickle.safetensors", "not a safetensors file (a pickle file"),
])  # fmt: skip
def test_pickle_is_never_unpickled(tmp_path, reads, name, problem):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    obj = {"x_embedder.weight": torch.zeros(2), "trap": Trap(marker)}
    if name.startswith("raw"):
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    error_of(lambda: load_dit(path), ValueError, str(path), problem)
    error_of(lambda: inspect(path), ValueError, str(path), problem)
    error_of(lambda: inspect(tmp_path), ValueError, str(tmp_path))  # a folder of only this file
    assert cli.main(["inspect", str(path)]) == 2
    assert not marker.exists() and reads == []

    # The control: the trap is armed. (torch.load would read a .safetensors name as safetensors.)
    if name.startswith("raw"):
        pickle.loads(path.read_bytes())
    else:
        torch.load(shutil.copy(path, tmp_path / "control.pt"), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", ["random", "empty", "header_only_length"])
def test_not_safetensors_bytes(tmp_path, reads, content):
    path = tmp_path / "model.safetensors"
    data = {"random": random.Random(0).randbytes(4096), "empty": b"", "header_only_length": (40).to_bytes(8, "little")}
    path.write_bytes(data[content])
    error_of(lambda: load_dit(path), ValueError, str(path), "not a safetensors file")
    assert reads == []


# --- strict keys and shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("change, parts", [
    ("wrong_shape", ["shape mismatch for 1 keys", "layers.1.feed_forward.w2.weight",
                     "file [256, 680] vs model [256, 682]"]),
    ("missing", ["1 missing keys", "layers.1.attention.out.weight"]),
    ("unexpected", ["1 unexpected keys", "layers.0.attention.bogus.weight"]),
])  # fmt: skip
def test_comfy_file_with_wrong_keys_or_shapes(tmp_path, comfy_sd, reads, change, parts):
    if change == "wrong_shape":
        comfy_sd["layers.1.feed_forward.w2.weight"] = torch.zeros(256, 680)
    elif change == "missing":
        del comfy_sd["layers.1.attention.out.weight"]
    else:
        comfy_sd["layers.0.attention.bogus.weight"] = torch.zeros(4, 4)
    path = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file(comfy_sd, path)
    error_of(lambda: load_dit(path), ValueError, str(path), *parts)
    error_of(lambda: inspect(path), ValueError, str(path), *parts)
    assert reads == []


@pytest.mark.parametrize("key", [
    "x_embedder.weight", "layers.0.attention.q_norm.weight", "layers.0.feed_forward.w1.weight",
])  # fmt: skip
def test_missing_a_key_the_config_is_read_from(tmp_path, comfy_sd, reads, key):
    del comfy_sd[key]
    path = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file(comfy_sd, path)
    error_of(lambda: load_dit(path), ValueError, str(path), "cannot infer the DiT config", key)
    assert cli.main(["inspect", str(path)]) == 2
    assert reads == []


def test_diffusers_shards_missing_one_of_q_k_v(tmp_path, dit_sd, reads):
    sd = {k: v for k, v in dit_sd.items() if k != "layers.1.attention.to_k.weight"}
    root = zf.write_sharded(sd, tmp_path / "model")
    error_of(lambda: load_dit(root), ValueError, "diffusion_pytorch_model-", "layers.1.attention.qkv.weight",
             "needs 3 equal row blocks", "layers.1.attention.to_q.weight", "layers.1.attention.to_v.weight")
    assert reads == []


def test_unsupported_comfy_quant_format(tmp_path, comfy_sd, reads):
    path = tmp_path / "z_image_turbo_nvfp4.safetensors"
    save_file(zf.comfy_quant_state_dict(comfy_sd, fmt="nvfp4"), path)
    error_of(lambda: load_dit(path), ValueError, str(path), ".comfy_quant", "'nvfp4'", "only float8")
    # Only the tiny JSON blob that names the format was read, no weights.
    assert [i.dtype for i in reads] == [torch.uint8] and reads[0].numel < 100


def test_malformed_comfy_quant_spec(tmp_path, comfy_sd):
    sd = zf.comfy_quant_state_dict(comfy_sd)
    sd["layers.0.attention.qkv.comfy_quant"] = torch.tensor(list(b"not json"), dtype=torch.uint8)
    path = tmp_path / "z_image_bad_quant.safetensors"
    save_file(sd, path)
    error_of(lambda: load_dit(path), ValueError, str(path), "layers.0.attention.qkv.comfy_quant", "JSON object")


# --- the CLI -----------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path, sharded: Path) -> dict[str, tuple[Path, str]]:
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(random.Random(1).randbytes(1000))
    pickle = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(2)}, pickle)
    (sharded / "transformer" / SHARD.format(i=2)).unlink()
    return {
        "random": (random_bytes, "not a safetensors file"),
        "pickle": (pickle, "a pickle checkpoint"),
        "missing_shard": (sharded, SHARD.format(i=2)),
        "no_such_path": (tmp_path / "nope.safetensors", "no such file"),
    }


def test_cli_bad_input_in_process(tmp_path, sharded, capsys):
    for path, problem in _bad_files(tmp_path, sharded).values():
        assert cli.main(["inspect", str(path)]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and str(path.name) in err and problem in err


@pytest.mark.parametrize("case", ["random", "missing_shard"])
def test_cli_bad_input_subprocess(tmp_path, sharded, case):
    path, problem = _bad_files(tmp_path, sharded)[case]
    proc = subprocess.run([sys.executable, "-m", "zimage_core", "inspect", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and path.name in lines[0] and problem in lines[0], proc.stderr


def test_the_read_spy_sees_a_real_load(tmp_path, comfy_sd, reads):
    """Guards the `reads == []` checks above: a good file does go through the spied reader."""
    path = tmp_path / "good.safetensors"
    save_file(comfy_sd, path)
    load_dit(path, dtype=torch.float32)
    assert len(reads) == len(comfy_sd) - 1  # every tensor but the unused norm_final.weight
