"""The training curve beside TensorBoard: `curve.jsonl` (one line per logged step) and `curve.png`.

Why both: TensorBoard needs a server to look at; a PNG written at the end of every run (loss
and learning rate against the step) is what a person opens first. The JSON lines survive a
resume: lines beyond the resumed step are dropped before new ones are appended, so a run
stopped and resumed draws the same curve as one that ran through. Drawn with Pillow alone
(no plotting library in the train extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CURVE_FILE = "curve.jsonl"
CURVE_PICTURE = "curve.png"
_PANEL = (560, 220)
_MARGIN = (70, 34, 20, 36)  # left, top, right, bottom


def keep_until(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (a resumed run starts over from there)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in kept))


def append_point(path: Path, step: int, loss: float, lr: float) -> None:
    """One logged step; flushed at once so a killed run keeps its curve up to its last log."""
    with path.open("a") as handle:
        handle.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")


def read_points(path: Path) -> dict[str, np.ndarray]:
    """Columns step / loss / lr of a curve file (empty arrays when there is none)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    return {key: np.asarray([row[key] for row in rows], np.float64) for key in ("step", "loss", "lr")}


def _panel(title: str, steps: np.ndarray, values: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    width, height = _PANEL
    left, top, right, bottom = _MARGIN
    picture = Image.new("RGB", _PANEL, "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=15)
    draw.text((left, 8), title, fill="black", font=font)
    box = (left, top, width - right, height - bottom)
    draw.rectangle(box, outline="black")
    if len(steps) == 0:
        draw.text((left + 10, top + 10), "no logged steps", fill="black", font=font)
        return picture
    low, high = float(values.min()), float(values.max())
    span_y = high - low or max(abs(high), 1e-12)
    first, last = float(steps.min()), float(steps.max())
    span_x = last - first or 1.0
    xs = box[0] + (steps - first) / span_x * (box[2] - box[0])
    ys = box[3] - (values - low) / span_y * (box[3] - box[1])
    points = list(zip(xs.tolist(), ys.tolist()))
    if len(points) == 1:
        draw.ellipse([points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=colour)
    else:
        draw.line(points, fill=colour, width=2)
    small = ImageFont.load_default(size=12)
    draw.text((4, box[1] - 6), f"{high:.3g}", fill="black", font=small)
    draw.text((4, box[3] - 8), f"{low:.3g}", fill="black", font=small)
    draw.text((box[0], box[3] + 6), f"step {first:.0f}", fill="black", font=small)
    draw.text((box[2] - 70, box[3] + 6), f"step {last:.0f}", fill="black", font=small)
    return picture


def write_picture(curve: Path, out: Path) -> Path:
    """Loss above learning rate, against the step, as one PNG."""
    points = read_points(curve)
    panels = [
        _panel("training loss", points["step"], points["loss"], (31, 119, 180)),
        _panel("learning rate", points["step"], points["lr"], (214, 39, 40)),
    ]
    sheet = Image.new("RGB", (_PANEL[0], _PANEL[1] * len(panels)), "white")
    for row, panel in enumerate(panels):
        sheet.paste(panel, (0, row * _PANEL[1]))
    sheet.save(out)
    return out
