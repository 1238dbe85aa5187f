"""plot.py: PNG panels from a run folder's metrics.jsonl (one per changing scalar), stage folders found."""
import json

import numpy as np
import pytest
from PIL import Image

import plot


def write_metrics(folder, n=30, preview=True):
    folder.mkdir(parents=True)
    lines = []
    for i in range(0, n, 3):
        record = {"iteration": i, "loss/scm": 100.0 / (i + 1), "lr": 1e-4, "data/bad_samples": 0, "time_s": i,
                  "loss/dmd": float("nan") if i == 3 else 2.0 + i % 4}
        if preview and i % 9 == 0:
            record["preview/student-1/precision"] = 0.5 + i / 100
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_a_run_becomes_loss_and_preview_pngs(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    plot.main(plot.Plot(runs=(tmp_path / "run",)))
    losses = np.asarray(Image.open(tmp_path / "run" / "plots" / "losses.png"))
    previews = np.asarray(Image.open(tmp_path / "run" / "plots" / "previews.png"))
    assert losses.shape == (plot.PANEL[1], 2 * plot.PANEL[0], 3)  # loss/scm and loss/dmd; the constants left out
    assert previews.shape == (plot.PANEL[1], plot.PANEL[0], 3)
    assert (losses[..., 2] > losses[..., 0] + 60).sum() > 200  # the blue curves are drawn
    assert "losses.png" in capsys.readouterr().out


def test_a_causal_run_folder_plots_every_stage_and_an_empty_folder_is_named(tmp_path):
    for stage in ("tf", "sf_dmd"):
        write_metrics(tmp_path / "causal" / stage, preview=False)
    plot.main(plot.Plot(runs=(tmp_path / "causal",)))
    assert {p.parent.parent.name for p in (tmp_path / "causal").glob("*/plots/losses.png")} == {"tf", "sf_dmd"}
    with pytest.raises(FileNotFoundError, match="holds no metrics.jsonl"):
        plot.main(plot.Plot(runs=(tmp_path / "nothing",)))
