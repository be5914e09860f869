"""Training inputs as a host gives them (text widgets, relative paths) → checked values for `train_lora`.

    captions = caption_lines("a photo of [trigger]\\n", n_images=4)   # one line for all → 4 captions
    resolutions = parse_resolutions("512, 768")                       # (512, 768)
    folder = inside(input_dir, "my_set", "folder")                     # refuses "/abs", "../up", ""
    line = progress_line(12, 40, 0.1234, seconds=6.0)                  # "step 12/40 · loss 0.1234 · …"

Every problem is one ValueError naming the widget and the value, raised before anything is encoded. Paths
given by a user are relative names that must stay inside a root folder (ComfyUI's input or loras folder):
no absolute path, no drive, no `..` part, so a workflow cannot read or write elsewhere.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

MIN_RESOLUTION = 64  # data.MIN_SIDE: smaller buckets would train on images smaller than any accepted file
RESOLUTION_STEP = 16  # bucket sides are multiples of 16 (the DiT's 2×2 patches of 8× VAE latents)


def caption_lines(text: str, n_images: int, default: str = "") -> list[str]:
    """One caption per image from a multiline widget: one non-empty line per image, one line for all, or none
    (then `default` for all). Lines are stripped; `[trigger]` is left for `data.apply_trigger`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        if not default.strip():
            raise ValueError("captions is empty and default_caption too: give one caption per image (one per "
                             "line), one line for all images, or a default caption")
        lines = [default.strip()]
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise ValueError(f"captions has {len(lines)} lines for {n_images} image(s): give one line per image, in "
                         "batch order, or a single line for all")
    return lines


def prompt_lines(text: str) -> list[str]:
    """Non-empty, stripped lines of a multiline prompt widget (each line one prompt)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_resolutions(text: str) -> tuple[int, ...]:
    """"512" or "512, 768, 1024" → bucket resolutions (the side of the square area each bucket keeps), each a
    multiple of 16 and at least 64, duplicates dropped, order kept."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError("resolutions is empty: give one or more sizes, e.g. 512 or 512, 768")
    out: list[int] = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"resolutions: {part!r} is not a whole number (e.g. 512, 768)") from None
        if value < MIN_RESOLUTION or value % RESOLUTION_STEP:
            raise ValueError(f"resolutions: {value} must be a multiple of {RESOLUTION_STEP} and at least "
                             f"{MIN_RESOLUTION}")
        if value not in out:
            out.append(value)
    return tuple(out)


def relative_name(name: str, what: str) -> str:
    """A user's relative path, refused unless it stays inside its root: not empty, not absolute, no drive,
    no `..` part. Returned with forward slashes and stripped."""
    cleaned = name.strip().replace("\\", "/")
    parts = PurePosixPath(cleaned).parts
    if not cleaned or PurePosixPath(cleaned).is_absolute() or PureWindowsPath(name.strip()).drive or ".." in parts:
        raise ValueError(f"{what} {name!r}: give a path relative to its folder, without '..' or a leading '/'")
    return cleaned


def inside(root: str | Path, name: str, what: str) -> Path:
    """`root/name` for a checked relative `name` (see `relative_name`); resolved, and refused if a link leads
    it out of `root`."""
    root = Path(root).resolve()
    path = (root / relative_name(name, what)).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{what} {name!r} leads outside {root}")
    return path


def progress_line(step: int, steps: int, loss: float, seconds: float, start: int = 0) -> str:
    """One progress text: step, loss, time per step and ETA, from `seconds` spent on the steps after `start`
    (a resumed run starts part-way; its speed is measured on this session's steps only)."""
    done = step - start
    if done <= 0:
        return f"step {step}/{steps} · loss {loss:.4f}"
    per_step = seconds / done
    return f"step {step}/{steps} · loss {loss:.4f} · {per_step:.2f} s/step · ETA {duration(per_step * (steps - step))}"


def duration(seconds: float) -> str:
    """12 s, 3m05s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
