"""The pack's API workflows queued in the real ComfyUI 0.3.75 host (headless, `--cpu`, started and stopped by PID).

Locks in: ComfyUI imports the pack without `IMPORT FAILED` and `/object_info` lists every node of ours;
`workflows/zimage_turbo.api.json` (tiny random models written under the real file names into a temporary
models folder) ends `success` and saves a PNG equal to `zimage_core.generate` for the same seed and
prompt (≤ 1 level of 255: ComfyUI truncates to uint8, and the node path goes through ComfyUI's raw-latent
convention and back, which changes float rounding only); a VAE chosen in the DiT loader is a node error
naming the file, the server keeps serving, and the next prompt succeeds. Breaks on a renamed node id,
a wrong LATENT/CONDITIONING/IMAGE convention, a seed that no longer gives ComfyUI's noise, or a
loader that crashes the server instead of failing the node.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import comfy_host
import te_fixtures as tf
import vae_fixtures as vf
from zimage_core import (
    PRESETS,
    ImageSize,
    Preset,
    SamplerConfig,
    load_dit,
    load_text_encoder,
    load_vae,
    make_noise,
    sample,
)
from zimage_core.pipeline import generate
from zimage_fixtures import comfy_state_dict, diffusers_dit

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
OUR_NODES = {"ZImageDiTLoader", "ZImageTextEncoderLoader", "ZImageVAELoader", "ZImageTextEncode", "ZImageSampler",
             "ZImageVAEDecode", "ZImageVAEEncode"}
BUNDLED_TOKENIZER = comfy_host.HOST_DIR / "comfy" / "text_encoders" / "qwen25_tokenizer"
SIZE, SEED, STEPS = ImageSize(64, 64), 42, 8


def write_models(models: Path) -> dict[str, Path]:
    """Tiny random DiT, Qwen3 (the real vocabulary, for ComfyUI's bundled tokenizer) and Flux VAE, real names."""
    paths = {"dit": models / "diffusion_models" / "z_image_turbo_bf16.safetensors",
             "te": models / "text_encoders" / "qwen_3_4b.safetensors", "vae": models / "vae" / "ae.safetensors"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    bf16 = lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()}  # noqa: E731  (as the real files are stored)
    save_file(bf16(comfy_state_dict(diffusers_dit(seed=3).state_dict())), paths["dit"])
    save_file(bf16(tf.hf_state_dict(tf.qwen3_model(seed=4, vocab_size=151936))), paths["te"])
    vf.write_bfl(bf16(vf.diffusers_vae(seed=5, ch=128).state_dict()), paths["vae"])  # real width: VAELoader takes it
    shutil.copy(paths["vae"], models / "diffusion_models" / "ae.safetensors")  # a VAE put in the wrong folder
    return paths


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = tmp_path_factory.mktemp("host")
    models = write_models(root / "models")
    extra = comfy_host.write_extra_paths(root / "extra_paths.yaml", root / "models")
    server = comfy_host.Server(root / "base", extra, root / "server.log").start()
    try:
        yield server, models
    finally:
        server.stop()
    assert server.proc.returncode is not None


@pytest.fixture(scope="module")
def core(host):
    """The same three files loaded by the core alone (fp32 CPU, ComfyUI's bundled tokenizer)."""
    _, models = host
    return (load_dit(models["dit"], "cpu", torch.float32),
            load_text_encoder(models["te"], "cpu", torch.float32, tokenizer=BUNDLED_TOKENIZER), load_vae(models["vae"]))


def as_saved(images: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] → what SaveImage writes: uint8 by truncation."""
    return np.clip(255.0 * images[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)


def level_diff(a: np.ndarray, b: np.ndarray, what: str) -> int:
    diff = np.abs(a.astype(int) - b.astype(int))
    print(f"{what}: max diff {diff.max()} levels, {np.mean(diff > 0):.2%} pixels differ")
    return int(diff.max())


def turbo_prompt(seed: int = SEED, **changes) -> dict:
    prompt = json.loads((WORKFLOWS / "zimage_turbo.api.json").read_text())
    prompt["5"]["inputs"].update(width=SIZE.width, height=SIZE.height)
    prompt["6"]["inputs"].update(seed=seed, steps=STEPS)
    for node, inputs in changes.items():
        prompt[node]["inputs"].update(inputs)
    return prompt


def saved_image(server, entry: dict, node: str = "8") -> np.ndarray:
    from PIL import Image

    (image,) = entry["outputs"][node]["images"]
    path = server.base_dir / "output" / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGB"))


def test_host_lists_every_node_and_imports_the_pack(host):
    server, _ = host
    known = set(server.get("/object_info"))
    assert OUR_NODES <= known
    for path in sorted(WORKFLOWS.glob("*.api.json")):  # every API workflow names only existing nodes
        assert {n["class_type"] for n in json.loads(path.read_text()).values()} <= known, path.name
    assert comfy_host.pack_import_problems(server.log()) == [], server.log()
    info = server.get("/object_info/ZImageDiTLoader")["ZImageDiTLoader"]
    assert "z_image_turbo_bf16.safetensors" in info["input"]["required"]["dit_name"][0]
    for node in OUR_NODES:  # every input has a tooltip
        spec = server.get(f"/object_info/{node}")[node]["input"]
        for name, (_, *opts) in {**spec["required"], **spec.get("optional", {})}.items():
            assert opts and opts[0].get("tooltip"), f"{node}.{name} has no tooltip"


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API prompt that a plain (no groups-as-nodes, no reroutes) UI-format workflow stands for: widget values
    in INPUT_TYPES order (combos and INT/FLOAT/STRING/BOOLEAN inputs are widgets; one with
    control_after_generate is followed by its control value), linked inputs as [node id, output slot]."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        spec = object_info[node["type"]]["input"]
        values = iter(node.get("widgets_values") or [])
        inputs = {}
        for name, (kind, *opts) in {**spec["required"], **spec.get("optional", {})}.items():
            if isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"):
                inputs[name] = next(values)
                if opts and opts[0].get("control_after_generate"):
                    next(values)
        assert next(values, None) is None, f"node {node['id']}: more widget values than widgets"
        for slot_index, slot in enumerate(node["inputs"]):
            if slot.get("link") is not None:
                link_id, origin, origin_slot, target, target_slot, kind = links[slot["link"]]
                assert (target, target_slot, kind) == (node["id"], slot_index, slot["type"]), link_id
                origin_node = next(n for n in ui["nodes"] if n["id"] == origin)
                assert link_id in origin_node["outputs"][origin_slot]["links"], link_id
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_ui_workflows_match_their_api_twins(host):
    """Each UI-format file (drag-and-drop) says what its `.api.json` twin says, read with the host's node specs."""
    server, _ = host
    object_info = server.get("/object_info")
    pairs = [(ui, ui.with_name(ui.name.removesuffix(".json") + ".api.json"))
             for ui in sorted(WORKFLOWS.glob("*.json")) if not ui.name.endswith(".api.json")]
    assert pairs
    for ui, api in pairs:
        expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                    for k, v in json.loads(api.read_text()).items()}
        assert ui_to_api(json.loads(ui.read_text()), object_info) == expected, ui.name


def test_turbo_api_workflow_equals_core_pipeline(host, core):
    server, _ = host
    entry = server.wait(server.queue(turbo_prompt()))
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = saved_image(server, entry)
    assert png.shape == (SIZE.height, SIZE.width, 3)
    text = turbo_prompt()["4"]["inputs"]["text"]
    expected = as_saved(generate(*core, text, SIZE, seed=SEED, cfg=PRESETS[Preset.TURBO]))
    assert level_diff(png, expected, "turbo workflow vs core generate") <= 1
    assert expected.std() > 5, "a flat image would make the comparison weak"


def test_a_saved_png_requeued_gives_the_identical_image(host):
    """The API prompt ComfyUI embeds in the PNG ("prompt" text chunk), queued again, gives the same pixels."""
    from PIL import Image

    server, _ = host
    entry = server.wait(server.queue(turbo_prompt(seed=7)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = entry["outputs"]["8"]["images"]
    first = server.base_dir / "output" / image["subfolder"] / image["filename"]
    embedded = json.loads(Image.open(first).info["prompt"])
    server.wait(server.queue(turbo_prompt(seed=8)))  # another prompt between: the re-queue must really re-run
    again = server.wait(server.queue(embedded))
    assert again["status"]["status_str"] == "success", again["status"]
    assert again["outputs"]["8"]["images"][0]["filename"] != image["filename"], "served from the cache, not re-run"
    assert np.array_equal(saved_image(server, again), np.asarray(Image.open(first).convert("RGB")))


def test_native_vae_decode_and_zero_out_interoperate(host, core):
    """Our LATENT through native VAEDecode = our decode (the raw-latent convention); ConditioningZeroOut as the
    negative at guidance 1 (ComfyUI cfg 2) = the core with zero negative captions."""
    server, _ = host
    prompt = turbo_prompt()
    prompt["6"]["inputs"].update(guidance=1.0, negative=["9", 0])
    prompt |= {"9": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
               "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
               "11": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["10", 0]}},
               "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "native"}}}
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    ours, native = saved_image(server, entry, "8"), saved_image(server, entry, "12")
    assert level_diff(native, ours, "native VAEDecode vs ZImageVAEDecode") <= 1

    dit, te, vae = core
    cap = te.encode([prompt["4"]["inputs"]["text"]])[0]
    with torch.inference_mode():
        x0 = sample(dit, make_noise(SEED, SIZE.latent_shape(1)), [cap], SamplerConfig(steps=STEPS, guidance=1.0),
                    [torch.zeros_like(cap)])
        expected = as_saved((vae.decode(x0) / 2 + 0.5).clamp(0, 1))
    assert level_diff(ours, expected, "guided sampler vs core sample") <= 1


def test_vae_in_dit_loader_is_a_node_error_and_server_recovers(host):
    server, _ = host
    entry = server.wait(server.queue(turbo_prompt(**{"1": {"dit_name": "ae.safetensors"}})))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "ZImageDiTLoader", entry["status"]
    assert "ae.safetensors" in errors[0]["exception_message"], errors[0]["exception_message"]
    print("node error:", errors[0]["exception_message"])
    entry = server.wait(server.queue(turbo_prompt(seed=SEED + 1)))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_interrupt_ends_the_run_as_interrupted_and_server_recovers(host):
    """POST /interrupt (for this prompt) during a long sampling: the history says interrupted, not an error."""
    server, _ = host
    long_run = {"5": {"width": 128, "height": 128}, "6": {"steps": 200}}  # seconds of work: POST lands mid-run
    prompt_id = server.queue(turbo_prompt(seed=SEED + 2, **long_run))
    deadline = time.monotonic() + 30
    while not any(item[1] == prompt_id for item in server.get("/queue")["queue_running"]):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.05)
    started = time.monotonic()
    assert server.post("/interrupt", {"prompt_id": prompt_id})[0] == 200
    entry = server.wait(prompt_id)
    kinds = [m[0] for m in entry["status"]["messages"]]
    print(f"interrupted {time.monotonic() - started:.2f} s after POST /interrupt; messages {kinds}")
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, entry["status"]
    assert "8" not in entry.get("outputs", {})
    entry = server.wait(server.queue(turbo_prompt(seed=SEED + 3)))
    assert entry["status"]["status_str"] == "success", entry["status"]
