"""`python -m zimage_core train CONFIG.toml`: headless LoRA training on tiny DiT/Qwen3/VAE files, CPU.

Locks in: a TOML with TrainConfig keys at the top level plus [models]/[data] tables trains (3 steps, rank 2,
64 px), prints `step N/M loss X lr Y` lines and the checkpoint, and leaves a LoRA that `read_lora` reads with
no unmatched key plus its resume state; Ctrl-C (SIGINT) stops after the step, saves, exits 130; relative paths
are relative to the TOML; bad input (unknown key at the top level or in a table, bad TOML, missing data folder
or model file) exits 2 with one line naming the file and the problem, before any model loads.
Breaks on: the tables leaking into TrainConfig (or unknown keys accepted), a SIGINT that kills without saving.
"""

import json
import signal
from pathlib import Path

import pytest
from PIL import Image

from train_fixtures import write_cli_models
from zimage_core import cli, cli_train
from zimage_core.lora import read_lora


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_train")
    write_cli_models(root)
    return root


@pytest.fixture
def run_dir(tmp_path, models) -> Path:
    data = tmp_path / "photos"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 90)).save(data / "a.png")
    (data / "a.txt").write_text("a photo of [trigger]", encoding="utf-8")
    Image.new("RGB", (80, 64), (10, 200, 10)).save(data / "b.jpg")  # no caption: the default one
    return tmp_path


def write_toml(run_dir: Path, models: Path, top: str = "", data_extra: str = "", folder: str = "photos") -> Path:
    toml = run_dir / "run.toml"
    toml.write_text(f"""
steps = 3
rank = 2
learning_rate = 1e-3
name = "zxq"
trigger = "zxq"
output_dir = "out"
{top}

[models]
dit = "{models / 'dit.safetensors'}"
text_encoder = "{models / 'qwen3.safetensors'}"
vae = "{models / 'ae.safetensors'}"
tokenizer = "{models / 'tokenizer'}"

[data]
folder = "{folder}"
default_caption = "a green [trigger]"
resolutions = [64]
cache_dir = "cache"
{data_extra}
""", encoding="utf-8")
    return toml


def test_train_writes_a_lora_and_its_state(run_dir, models, capsys):
    rc = cli.main(["train", str(write_toml(run_dir, models)), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert [line.split(" loss ")[0] for line in lines if line.startswith("step ")] == ["step 1/3", "step 2/3",
                                                                                       "step 3/3"]
    assert " lr 0.001 " in lines[0]
    lora_path, state_path = run_dir / "out" / "zxq_000003.safetensors", run_dir / "out" / "zxq_000003.state.safetensors"
    assert lines[-2:] == [f"lora: {lora_path}", f"state: {state_path}"]
    assert state_path.is_file()
    lora = read_lora(lora_path)
    assert lora.patches and not lora.unmatched
    assert any((run_dir / "cache").iterdir())  # [data] cache_dir, relative to the TOML


def test_previews_dop_ema_loss_curve_and_eta(run_dir, models, capsys):
    """[previews] writes decoded PNGs after steps 2 and 3 (every 2 + the end), one per prompt; DOP/EMA are
    top-level TrainConfig keys; the loss curve is written at the end; step lines carry an ETA."""
    toml = write_toml(run_dir, models, top='ema_decay = 0.5\ndop_class = "dog"\ndop_multiplier = 0.5',
                      data_extra='\n[previews]\nprompts = ["a [trigger] portrait", "a red car"]\nevery = 2\n'
                                 'width = 32\nheight = 48\nseed = 3\nsample_steps = 1')
    rc = cli.main(["train", str(toml), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    steps = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all(", eta " in line for line in steps) and steps[-1].endswith("eta 0 s)")
    folder = run_dir / "out" / "previews"
    assert sorted(p.name for p in folder.iterdir()) == [f"zxq_{s:06d}_{i}.png" for s in (2, 3) for i in (0, 1)]
    with Image.open(folder / "zxq_000003_1.png") as im:
        assert im.size == (32, 48)
    with Image.open(run_dir / "out" / "zxq_loss.png") as im:
        assert im.size == (768, 384)
    assert f"loss curve: {run_dir / 'out' / 'zxq_loss.png'}" in captured.out
    saved = json.loads(read_lora(run_dir / "out" / "zxq_000003.safetensors").metadata["zimage_train.config"])
    assert (saved["dop_class"], saved["dop_multiplier"], saved["ema_decay"]) == ("dog", 0.5, 0.5)


def test_bad_previews_table_exits_2_before_a_model_loads(run_dir, models, capsys, monkeypatch):
    monkeypatch.setattr("zimage_core.text_encoder.load_text_encoder", lambda *a, **k: 1 / 0)
    for extra, message in (("prompts = []\nevery = 2", "[previews] prompts must be a non-empty list"),
                           ('prompts = ["a"]\nevery = 2\nwidth = 40', "[previews] width must be a multiple of 16"),
                           ('prompts = ["a"]', "[previews] needs every"),
                           ('prompts = ["a"]\nevery = 1\nsteps = 3', "unknown option(s) in [previews]: steps")):
        toml = write_toml(run_dir, models, data_extra=f"\n[previews]\n{extra}")
        assert cli.main(["train", str(toml)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_sigint_stops_after_the_step_and_saves(run_dir, models, capsys, monkeypatch):
    """A SIGINT during step 1 (as Ctrl-C would): the loop stops there, saves step 1 and exits 130."""
    from zimage_core import train

    real_train_lora = train.train_lora

    def train_with_ctrl_c(*args, on_step, **kw):
        def hooked(step, loss, lr):
            if step == 1:
                signal.raise_signal(signal.SIGINT)
            on_step(step, loss, lr)
        return real_train_lora(*args, on_step=hooked, **kw)

    monkeypatch.setattr(train, "train_lora", train_with_ctrl_c)
    rc = cli.main(["train", str(write_toml(run_dir, models, top=""))])
    captured = capsys.readouterr()
    assert rc == cli_train.INTERRUPTED
    assert "interrupted at step 1/3" in captured.err
    assert (run_dir / "out" / "zxq_000001.state.safetensors").is_file()
    assert not (run_dir / "out" / "zxq_000003.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.parametrize(("kind", "message"), [
    ("top", "unknown option(s) learning_rat"),
    ("table", "unknown option(s) in [data]: resolution"),
    ("folder", "[data] folder"),
    ("model", "[models] dit"),
    ("syntax", "not valid TOML"),
    ("value", "rank must be an integer"),
])
def test_bad_config_is_one_line_and_exit_2(run_dir, models, capsys, monkeypatch, kind, message):
    def fail(*_a, **_k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr("zimage_core.text_encoder.load_text_encoder", fail)
    toml = {"top": lambda: write_toml(run_dir, models, top="learning_rat = 1e-3"),
            "table": lambda: write_toml(run_dir, models, data_extra="resolution = 64"),
            "folder": lambda: write_toml(run_dir, models, folder="nowhere"),
            "model": lambda: write_toml(run_dir, models).with_name("m.toml"),
            "syntax": lambda: write_toml(run_dir, models, top="rank = = 2"),
            "value": lambda: write_toml(run_dir, models, top="").with_name("v.toml")}[kind]()
    if kind == "model":
        toml.write_text((run_dir / "run.toml").read_text().replace("dit.safetensors", "gone.safetensors"))
    if kind == "value":
        toml.write_text((run_dir / "run.toml").read_text().replace("rank = 2", "rank = 0"))
    assert cli.main(["train", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {toml}: ") and message in err and err.count("\n") == 1, err
    assert not (run_dir / "out").exists()
