"""The pack's API workflows queued in the real ComfyUI 0.3.75 host (headless, `--cpu`, started and stopped by PID).

Locks in: ComfyUI imports the pack without `IMPORT FAILED` and `/object_info` lists exactly our nodes;
every `workflows/*.api.json` (tiny random models under the real file names, host_models.py) ends
`success` with its images; the Turbo and img2img workflows save a PNG equal to `zimage_core.generate`
for the same seed and prompt (≤ 1 level of 255: ComfyUI truncates to uint8, and the node path goes
through ComfyUI's raw-latent convention and back, which changes float rounding only); the official
sharded release through Z-Image DiT → MODEL and ComfyUI's own KSampler and VAEDecode gives the Turbo
workflow's image; interrupt stops within one step; POST /free gives a DiT's memory back; bad input (a
VAE in the DiT loader, a missing file, a width not a multiple of 16) is a node error or a rejected
prompt naming the value, and the server keeps serving. The LoRA workflows: two chained Z-Image LoRA nodes
(musubi + AI Toolkit files, the second normalising the stack) give `generate` with both LoRAs applied by the core
at the normalised strengths (≤ 1 level); LoRA Convert writes a comfy file that reads back to the source's ΔW and
never overwrites (a counter, as ComfyUI's savers); a Flux LoRA or a filename with '..' is a node error naming it.
Breaks on a renamed node id, a wrong LATENT/CONDITIONING/IMAGE convention, a seed that no longer gives ComfyUI's
noise, a model kept alive after /free, or a loader that crashes the server instead of failing the node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import comfy_host
from host_models import FOREIGN_LORA, bundled_tokenizer, serving, write_workflow_loras
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
from zimage_core.lora import LoraFormat, apply_loras, normalised_strengths, read_lora
from zimage_core.pipeline import generate
from zimage_fixtures import comfy_state_dict, diffusers_dit

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
OUR_NODES = {"ZImageDiTLoader", "ZImageTextEncoderLoader", "ZImageVAELoader", "ZImageTextEncode", "ZImageSampler",
             "ZImageVAEDecode", "ZImageVAEEncode", "ZImageDiTToModel", "ZImageLoraLoader", "ZImageLoraInspect",
             "ZImageLoraConvert", "ZImageSaveMergedDiT", "ZImageTrainLora", "ZImageTrainOptions"}
IMAGE_OUTPUTS = {"SaveImage", "PreviewImage"}
TEXT_OUTPUTS = {"PreviewAny", "ZImageLoraInspect", "ZImageLoraConvert", "ZImageSaveMergedDiT"}  # {"ui": {"text": …}}
SIZE, SEED, STEPS = ImageSize(64, 64), 42, 8


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("host")) as (server, models):
        yield server, models
    assert server.proc.returncode is not None


@pytest.fixture(scope="module")
def core(host):
    """The same three files loaded by the core alone (fp32 CPU, ComfyUI's bundled tokenizer)."""
    _, models = host
    return (load_dit(models["dit"], "cpu", torch.float32),
            load_text_encoder(models["te"], "cpu", torch.float32, tokenizer=bundled_tokenizer()),
            load_vae(models["vae"]))


def as_saved(images: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] → what SaveImage writes: uint8 by truncation."""
    return np.clip(255.0 * images[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)


def level_diff(a: np.ndarray, b: np.ndarray, what: str) -> int:
    diff = np.abs(a.astype(int) - b.astype(int))
    print(f"{what}: max diff {diff.max()} levels, {np.mean(diff > 0):.2%} pixels differ")
    return int(diff.max())


def turbo_prompt(seed: int = SEED, **changes) -> dict:
    prompt = shrunk(json.loads((WORKFLOWS / "zimage_turbo.api.json").read_text()))
    prompt["6"]["inputs"].update(seed=seed, steps=STEPS)
    for node, inputs in changes.items():
        prompt[node]["inputs"].update(inputs)
    return prompt


def saved_image(server, entry: dict, node: str = "8") -> np.ndarray:
    return server.image(entry, node)


def test_host_lists_every_node_and_imports_the_pack(host):
    server, _ = host
    object_info = server.get("/object_info")
    known = set(object_info)
    ours = {name for name, spec in object_info.items() if spec["python_module"] == "custom_nodes.comfyui_zimage"}
    assert ours == OUR_NODES  # a node added, renamed or lost shows here
    assert all(object_info[n]["category"].startswith("Z-Image") for n in ours)
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
    control_after_generate is followed by its control value, one with image_upload by the upload button's),
    linked inputs as [node id, output slot]."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        spec = object_info[node["type"]]["input"]
        values = iter(node.get("widgets_values") or [])
        inputs = {}
        for name, (kind, *opts) in {**spec["required"], **spec.get("optional", {})}.items():
            if isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"):
                inputs[name] = next(values)
                if opts and (opts[0].get("control_after_generate") or opts[0].get("image_upload")):
                    next(values)  # the control widget's value / the upload button's ("image")
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
    error = node_error(server.wait(server.queue(turbo_prompt(**{"1": {"dit_name": "ae.safetensors"}}))))
    assert error["node_type"] == "ZImageDiTLoader"
    assert "ae.safetensors" in error["exception_message"], error["exception_message"]
    entry = server.wait(server.queue(turbo_prompt(seed=SEED + 1)))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_interrupt_stops_sampling_within_one_step_and_server_recovers(host):
    """POST /interrupt during an 8-step sampling: at most the step in flight finishes (websocket progress), the
    history says interrupted (not an error), and the next prompt succeeds."""
    server, _ = host
    slow = {"5": {"width": 256, "height": 256}}  # about a second a step here: the POST lands mid-run
    with server.watch("interrupt-test") as ws:
        prompt_id = server.queue(turbo_prompt(seed=SEED + 2, **slow), client_id="interrupt-test")
        deadline = time.monotonic() + 60
        while not any(d["value"] >= 2 and d["node"] == "6" for _, d in ws.of_type("progress")):
            assert time.monotonic() < deadline, "sampling never reached step 2"
            time.sleep(0.01)
        posted = time.monotonic()
        assert server.post("/interrupt", {"prompt_id": prompt_id})[0] == 200
        entry = server.wait(prompt_id)
    steps = [d["value"] for t, d in ws.of_type("progress") if d["node"] == "6"]
    after = [d["value"] for t, d in ws.of_type("progress") if d["node"] == "6" and t > posted]
    kinds = [m[0] for m in entry["status"]["messages"]]
    print(f"progress {steps}; {len(after)} step(s) finished after POST /interrupt; messages {kinds}")
    assert len(after) <= 1 and max(steps) < 8
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, entry["status"]
    assert "8" not in entry.get("outputs", {})
    entry = server.wait(server.queue(turbo_prompt(seed=SEED + 3)))
    assert entry["status"]["status_str"] == "success", entry["status"]


def shrunk(prompt: dict, side: int = SIZE.width) -> dict:
    """A workflow at test size: every EmptySD3LatentImage, ImageScale and trainer preview set to side × side."""
    for node in prompt.values():
        if node["class_type"] in ("EmptySD3LatentImage", "ImageScale", "ZImageTrainLora"):
            node["inputs"].update(width=side, height=side)
    return prompt


def node_error(entry: dict) -> dict:
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and len(errors) == 1, entry["status"]
    print("node error:", errors[0]["node_type"], errors[0]["exception_message"])
    return errors[0]


@pytest.mark.parametrize("workflow", sorted(p.name for p in WORKFLOWS.glob("*.api.json")))
def test_every_api_workflow_runs_in_the_host(host, workflow):
    server, _ = host
    prompt = shrunk(json.loads((WORKFLOWS / workflow).read_text()))
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    savers = [k for k, v in prompt.items() if v["class_type"] in IMAGE_OUTPUTS]
    texts = [k for k, v in prompt.items() if v["class_type"] in TEXT_OUTPUTS]
    assert savers + texts and set(savers + texts) <= set(entry["outputs"])
    for node in savers:
        images = server.images(entry, node)
        assert images and all(i.shape == (SIZE.height, SIZE.width, 3) for i in images), workflow
    for node in texts:
        assert entry["outputs"][node]["text"][0].strip(), (workflow, node)


def test_img2img_workflow_equals_core(host, core):
    from PIL import Image

    server, _ = host
    prompt = shrunk(json.loads((WORKFLOWS / "zimage_img2img.api.json").read_text()))
    prompt["6"]["inputs"]["upscale_method"] = "nearest-exact"  # 64 → 64: the identity, so the core sees the same pixels
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    dit, te, vae = core
    image = np.asarray(Image.open(server.base_dir / "input" / "example.png").convert("RGB"), dtype=np.float32)
    pixels = torch.from_numpy(image / 255.0).permute(2, 0, 1)[None] * 2 - 1
    with torch.inference_mode():
        latent = vae.encode(pixels)
    sampler = prompt["8"]["inputs"]
    expected = as_saved(generate(dit, te, vae, prompt["4"]["inputs"]["text"], SIZE, seed=sampler["seed"],
                                 cfg=PRESETS[Preset.TURBO], latent=latent, strength=sampler["denoise"]))
    assert level_diff(saved_image(server, entry, "10"), expected, "img2img workflow vs core generate") <= 1


def test_official_sharded_dit_in_native_ksampler_equals_our_sampler(host):
    """The official sharded release through our loaders, Z-Image DiT → MODEL, ComfyUI's KSampler (euler, simple,
    8 steps, cfg 1) and native VAEDecode = the Turbo workflow (single files, our sampler and decode), same seed."""
    server, _ = host
    official = shrunk(json.loads((WORKFLOWS / "zimage_official_ksampler.api.json").read_text()))
    official["7"]["inputs"]["seed"] = SEED
    entry = server.wait(server.queue(official))
    assert entry["status"]["status_str"] == "success", entry["status"]
    turbo = server.wait(server.queue(turbo_prompt()))
    assert official["4"]["inputs"]["text"] == turbo_prompt()["4"]["inputs"]["text"]
    assert level_diff(saved_image(server, entry, "10"), saved_image(server, turbo), "official+KSampler vs ours") <= 1


def test_width_not_a_multiple_of_16_is_a_node_error(host):
    server, _ = host
    error = node_error(server.wait(server.queue(turbo_prompt(**{"5": {"width": 72}}))))
    assert error["node_type"] == "ZImageSampler" and "multiple of 16" in error["exception_message"]
    assert server.wait(server.queue(turbo_prompt(seed=SEED + 4)))["status"]["status_str"] == "success"


def test_missing_model_file_is_rejected_by_name(host):
    server, _ = host
    missing = turbo_prompt(**{"1": {"dit_name": "z_image_missing.safetensors"}})
    status, body = server.post("/prompt", {"prompt": missing})
    assert status == 400 and "1" in body["node_errors"], body
    assert "z_image_missing.safetensors" in json.dumps(body["node_errors"]["1"])
    assert server.wait(server.queue(turbo_prompt(seed=SEED + 5)))["status"]["status_str"] == "success"


def test_two_prompts_queued_at_once_both_succeed(host):
    server, _ = host
    first, second = server.queue(turbo_prompt(seed=SEED + 6)), server.queue(turbo_prompt(seed=SEED + 7))
    a, b = server.wait(first), server.wait(second)
    assert a["status"]["status_str"] == b["status"]["status_str"] == "success"
    assert not np.array_equal(saved_image(server, a), saved_image(server, b))


def test_free_releases_the_dit(host):
    """POST /free (unload models, free memory) releases a loaded DiT: with nothing else loaded, a DiT of 48 layers
    loaded (DiT loader → PreviewAny) and then freed lowers the server's RSS by more than its file and by ≥ 90 % of its
    in-memory size (fp32 on the CPU, twice the bf16 file; measured 95 % after every workflow ran, 99 % alone: small
    tensors live in malloc's heap, other small allocations come and go, and heap left free by earlier prompts is
    reused by the load; at 24 layers those few MiB made it 89–92 %), back to within 5 % of the idle level; the next
    prompt loads again and succeeds. The first cycle pays one-time allocations (imports, caches): the second counts."""
    server, models = host
    path = models["dit"].with_name("z_image_memory_probe.safetensors")
    state = comfy_state_dict(diffusers_dit(seed=9, n_layers=48).state_dict())
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, path)
    dit_bytes = sum(v.numel() * 4 for v in state.values())
    load_only = {"1": {"class_type": "ZImageDiTLoader", "inputs": {"dit_name": path.name, "weight_dtype": "default"}},
                 "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}

    def free() -> int:
        assert server.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
        time.sleep(2)  # the prompt worker wakes up, unloads, drops its caches and collects
        return server.rss_bytes()

    for weight_dtype in ("fp8_e4m3fn", "default"):  # another input each time: no cache hit
        idle = free()
        load_only["1"]["inputs"]["weight_dtype"] = weight_dtype
        entry = server.wait(server.queue(load_only))
        assert entry["status"]["status_str"] == "success", entry["status"]
        loaded = server.rss_bytes()
        freed = free()
    print(f"PreviewAny: {entry['outputs']['2']['text'][0]}; RSS idle {idle / 2**20:.1f} MiB, DiT loaded "
          f"{loaded / 2**20:.1f}, after POST /free {freed / 2**20:.1f}; DiT {dit_bytes / 2**20:.1f} MiB in memory")
    assert loaded - freed >= max(0.9 * dit_bytes, path.stat().st_size)
    assert freed - idle <= 0.05 * dit_bytes
    assert server.wait(server.queue(turbo_prompt(seed=SEED + 9)))["status"]["status_str"] == "success"


def api_workflow(name: str) -> dict:
    return shrunk(json.loads((WORKFLOWS / name).read_text()))


def test_two_lora_workflow_equals_core_generate_with_both_loras(host, core):
    """Two chained Z-Image LoRA nodes, the second with normalise on: the image equals `generate` with both LoRAs
    applied by the core at the stack's normalised strengths; the report says so; the LoRAs really change the image."""
    server, models = host
    prompt = api_workflow("zimage_two_loras.api.json")
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    nodes = [prompt[n]["inputs"] for n in ("4", "5")]
    assert [n["normalise"] for n in nodes] == [False, True]
    strengths = normalised_strengths([n["strength"] for n in nodes])  # the last node normalises the whole stack
    assert sum(map(abs, strengths)) == pytest.approx(1.0)
    loras = [(read_lora(models["loras"] / n["lora_name"]), s) for n, s in zip(nodes, strengths, strict=True)]
    dit, te, vae = core
    text, sampler = prompt["6"]["inputs"]["text"], prompt["8"]["inputs"]
    base = as_saved(generate(dit, te, vae, text, SIZE, seed=sampler["seed"], cfg=PRESETS[Preset.TURBO]))
    applied = apply_loras(dit, loras)
    try:
        expected = as_saved(generate(dit, te, vae, text, SIZE, seed=sampler["seed"], cfg=PRESETS[Preset.TURBO]))
    finally:
        applied.remove()
    png = saved_image(server, entry, "10")
    assert level_diff(png, expected, "two-LoRA workflow vs core generate with both LoRAs") <= 1
    assert level_diff(png, base, "two-LoRA workflow vs the base DiT") > 5  # measured 12
    report = entry["outputs"]["11"]["text"][0]
    assert "normalised" in report and all(f"{n['lora_name']} (strength" in report for n in nodes), report


def dense_delta(lora) -> dict[str, torch.Tensor]:
    """ΔW at strength 1 per canonical weight, full shape (row blocks of fused weights placed)."""
    out: dict[str, torch.Tensor] = {}
    for p in lora.patches:
        d = p.adapter.delta(torch.float32)
        rows = d.shape[0]
        full = out.setdefault(f"{p.target.module}.weight", torch.zeros(rows * p.target.parts, *d.shape[1:]))
        full[p.target.part * rows:(p.target.part + 1) * rows] += d
    return out


def test_lora_convert_workflow_writes_the_source_delta_and_never_overwrites(host, tmp_path):
    """The convert workflow's Convert node (musubi → comfy) writes loras/<filename>_comfy_00001_.safetensors; read
    back, it is a comfy-format LoRA whose ΔW is the source file's (lora_fixtures' own ΔW, float32). Run again with
    other inputs, it writes _00002_ beside it and leaves the first file as it was. Inspect reports the source."""
    server, models = host
    prompt = api_workflow("zimage_lora_convert.api.json")
    prompt["3"]["inputs"]["filename"] = "convert_test"  # not the every-workflow run's name: a fresh counter
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    first = models["loras"] / "convert_test_comfy_00001_.safetensors"
    assert entry["outputs"]["3"]["text"][0].startswith(f"wrote {first}"), entry["outputs"]["3"]
    converted = read_lora(first)
    assert converted.format is LoraFormat.COMFY and not converted.unmatched
    source = write_workflow_loras(tmp_path)[prompt["3"]["inputs"]["lora_name"]]
    got = dense_delta(converted)
    assert got.keys() == source.deltas.keys()
    err = max(((got[k] - v).abs().max() / v.abs().max()).item() for k, v in source.deltas.items())
    print(f"converted ΔW vs the source's: max rel err {err:.1e}")
    assert err <= 1e-6
    inspect = entry["outputs"]["1"]["text"][0]
    assert "musubi format" in inspect and "layers 0–1" in inspect, inspect
    before = first.read_bytes()
    prompt["3"]["inputs"]["lokr_rank"] = 4  # another input (no effect on a LoRA): not served from the cache
    again = server.wait(server.queue(prompt))
    assert again["status"]["status_str"] == "success", again["status"]
    assert (models["loras"] / "convert_test_comfy_00002_.safetensors").is_file() and first.read_bytes() == before


def test_bad_lora_inputs_are_node_errors_and_server_recovers(host):
    """A Flux LoRA in Z-Image LoRA and in Inspect, and a filename with '..' in Convert and Save Merged DiT, each fail
    their node with a message naming the problem; nothing is written outside the model folders; the server serves."""
    server, models = host
    with_lora = turbo_prompt(**{"6": {"dit": ["20", 0]}})
    with_lora["20"] = {"class_type": "ZImageLoraLoader",
                       "inputs": {"dit": ["1", 0], "lora_name": FOREIGN_LORA, "strength": 1.0}}
    cases = {
        "ZImageLoraLoader": (with_lora, "Flux"),
        "ZImageLoraInspect": ({"1": {"class_type": "ZImageLoraInspect", "inputs": {"lora_name": FOREIGN_LORA}}},
                              "Flux"),
        "ZImageLoraConvert": ({"1": {"class_type": "ZImageLoraConvert", "inputs": {
            "lora_name": "zimage_style_musubi.safetensors", "to": "comfy", "filename": "../escaped"}}}, "'..'"),
        "ZImageSaveMergedDiT": ({"1": turbo_prompt()["1"], "2": {"class_type": "ZImageSaveMergedDiT", "inputs": {
            "dit": ["1", 0], "filename": "../escaped", "layout": "comfy", "dtype": "bf16"}}}, "'..'"),
    }
    for node_type, (prompt, says) in cases.items():
        error = node_error(server.wait(server.queue(prompt)))
        assert error["node_type"] == node_type and says in error["exception_message"], error
    assert not list(models["loras"].parent.parent.rglob("escaped*"))
    assert server.wait(server.queue(turbo_prompt(seed=SEED + 10)))["status"]["status_str"] == "success"


def test_save_merged_dit_reads_back_as_the_runtime_lora(host):
    """Z-Image Save Merged DiT after a Z-Image LoRA node, in both layouts (fp32): the file (diffusion_models) and the
    official root (diffusers/<name>/transformer/) appear in Z-Image DiT Loader's list, and the Turbo workflow on
    either gives the image of the base DiT with the LoRA applied at run time (≤ 1 level). The tiny DiT is not
    ComfyUI-detectable (dim 256), so ComfyUI's UNETLoader is not tried here."""
    server, _ = host
    lora = {"class_type": "ZImageLoraLoader",
            "inputs": {"dit": ["1", 0], "lora_name": "zimage_style_musubi.safetensors", "strength": 0.8}}
    runtime = turbo_prompt(**{"6": {"dit": ["20", 0]}}) | {"20": lora}
    expected = server.wait(server.queue(runtime))
    assert expected["status"]["status_str"] == "success", expected["status"]
    for layout, name in (("comfy", "merged_test_00001_.safetensors"), ("diffusers", "merged_test_00001_/")):
        save = {"1": turbo_prompt()["1"], "20": lora, "21": {"class_type": "ZImageSaveMergedDiT", "inputs": {
            "dit": ["20", 0], "filename": "merged_test", "layout": layout, "dtype": "fp32"}}}
        entry = server.wait(server.queue(save))
        assert entry["status"]["status_str"] == "success", entry["status"]
        print(entry["outputs"]["21"]["text"][0])
        assert name in server.get("/object_info/ZImageDiTLoader")["ZImageDiTLoader"]["input"]["required"][
            "dit_name"][0]
        merged = server.wait(server.queue(turbo_prompt(**{"1": {"dit_name": name}})))
        assert merged["status"]["status_str"] == "success", merged["status"]
        assert level_diff(saved_image(server, merged), saved_image(server, expected),
                          f"merged ({layout}) vs runtime LoRA") <= 1
