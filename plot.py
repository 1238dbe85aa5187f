"""Look at a run instead of reading it: metrics.jsonl as PNG curves.

    python plot.py runs/toy                  # runs/toy/plots/losses.png (and previews.png: the toy previews' metrics)
    python plot.py runs/causal_toy           # a causal run folder: one pair of PNGs per stage

One panel per scalar that changes, losses first: the raw values faint, their exponential moving average on top
(losses on a log axis when they span more than two decades). Drawn with Pillow (imageio's own dependency), so
nothing more is installed.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import tyro
from PIL import Image, ImageDraw

import parallel

PANEL, MARGIN, COLUMNS = (360, 210), (52, 26, 12, 28), 3  # panel size; margins left, top, right, bottom


@dataclass
class Plot:
    """PNG curves of run folders' metrics.jsonl."""
    runs: tyro.conf.Positional[tuple[Path, ...]]  # run folders (a causal run: its stage folders are found)
    smooth: float = 0.9  # weight of the moving average drawn over the raw values (0: none)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{scalar: [(iteration, value)]} of a metrics.jsonl, non-finite values dropped."""
    series = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for k, v in record.items():
            if k not in ("iteration", "time_s") and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, []).append((record["iteration"], float(v)))
    return series


def label(v: float) -> str:
    return f"{v:.3g}"


def draw_panel(draw: ImageDraw.ImageDraw, x0: int, y0: int, name: str, points, smooth: float):
    """One scalar's curve in the panel whose top-left corner is (x0, y0)."""
    (w, h), (ml, mt, mr, mb) = PANEL, MARGIN
    box = (x0 + ml, y0 + mt, x0 + w - mr, y0 + h - mb)
    draw.text((x0 + ml, y0 + 6), name, fill="black")
    draw.rectangle(box, outline=(150, 150, 150))
    its, vals = [p[0] for p in points], [p[1] for p in points]
    log = min(vals) > 0 and max(vals) / min(vals) > 100
    f = math.log10 if log else (lambda v: v)
    lo, hi = f(min(vals)), f(max(vals))
    hi = hi if hi > lo else lo + 1
    i_lo, i_hi = min(its), max(max(its), min(its) + 1)
    xy = lambda i, v: (box[0] + (i - i_lo) / (i_hi - i_lo) * (box[2] - box[0]),
                       box[3] - (f(v) - lo) / (hi - lo) * (box[3] - box[1]))
    average, ema = [], None
    smooth = smooth if name.startswith("loss/") else 0.0  # (schedules and counters are not noisy)
    for v in vals:
        ema = v if ema is None else smooth * ema + (1 - smooth) * v
        average.append(ema)
    if len(points) > 1:
        draw.line([xy(i, v) for i, v in points], fill=(160, 190, 230), width=1)
        draw.line([xy(i, v) for i, v in zip(its, average)], fill=(20, 70, 160), width=2)
    else:
        x, y = xy(its[0], vals[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(20, 70, 160))
    draw.text((x0 + 2, box[1] - 4), label(max(vals)), fill="black")
    draw.text((x0 + 2, box[3] - 8), label(min(vals)) + (" log" if log else ""), fill="black")
    draw.text((box[0], box[3] + 4), str(i_lo), fill="black")
    draw.text((box[2] - 6 * len(str(i_hi)), box[3] + 4), str(i_hi), fill="black")


def plot(series: dict, path: Path, smooth: float):
    """A grid of panels, one per scalar of `series`, as a PNG at path."""
    rows = -(-len(series) // COLUMNS)
    image = Image.new("RGB", (PANEL[0] * min(COLUMNS, len(series)), PANEL[1] * rows), "white")
    draw = ImageDraw.Draw(image)
    for k, (name, points) in enumerate(series.items()):
        draw_panel(draw, PANEL[0] * (k % COLUMNS), PANEL[1] * (k // COLUMNS), name, points, smooth)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def plot_run(folder: Path, smooth: float) -> list[Path]:
    """folder/plots/losses.png (the training scalars) and previews.png (the toy previews' exact metrics)."""
    series = read_metrics(folder / "metrics.jsonl")
    series = {k: v for k, v in series.items() if len({p[1] for p in v}) > 1}  # (a constant says nothing)
    series = dict(sorted(series.items(), key=lambda kv: not kv[0].startswith("loss/")))  # losses first
    written = []
    for name, previews in (("losses", False), ("previews", True)):
        chosen = {k: v for k, v in series.items() if k.startswith("preview/") == previews}
        if chosen:
            plot(chosen, folder / "plots" / f"{name}.png", smooth)
            written.append(folder / "plots" / f"{name}.png")
    return written


def main(cfg: Plot):
    if not 0 <= cfg.smooth < 1:
        raise ValueError(f"--smooth must lie in [0, 1), got {cfg.smooth}")
    for run in cfg.runs:
        folders = [run] if (run / "metrics.jsonl").exists() else sorted(p.parent for p in run.glob("*/metrics.jsonl"))
        if not folders:
            raise FileNotFoundError(f"{run} holds no metrics.jsonl (nor do its sub-folders): pass a run folder")
        for folder in folders:
            for path in plot_run(folder, cfg.smooth):
                print(path)


if __name__ == "__main__":
    parallel.cli(main, tyro.cli(Plot))
