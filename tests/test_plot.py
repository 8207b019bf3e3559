"""charnn plot: loss curves from metrics.jsonl, read back from the image file (PNG header and
size, SVG parsed), old metrics files, and the one-line errors."""

from __future__ import annotations

import json
import struct
import sys
import xml.etree.ElementTree as ET

import numpy
import pytest

from charnn.io.metrics import curves

from cli_support import check_error, check_ok, invoke, metrics, train, write_corpus

pytest.importorskip("matplotlib")

SVG = "{http://www.w3.org/2000/svg}"


def write_metrics(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines), encoding="utf-8")
    return folder


def new_style(folder, losses, vals, every=10):
    """Train lines every 5 steps (5 s and 500 tokens apart), evaluation lines every ``every``."""
    lines = []
    for i, loss in enumerate(losses, 1):
        step = 5 * i
        lines.append({"type": "train", "step": step, "epoch": step / 100, "tokens": 100 * step,
                      "elapsed": float(step), "train_loss": loss})
        if step % every == 0 and vals:
            lines.append({"type": "eval", "step": step, "epoch": step / 100, "tokens": 100 * step,
                          "elapsed": step + 0.5, "val_loss": vals.pop(0)})
    return write_metrics(folder, lines)


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == SVG + "svg"
    return ["".join(t.itertext()) for t in root.iter(SVG + "text")]


def test_png_of_one_run(tmp_path):
    run = new_style(tmp_path / "runA", [3.0, 2.5, 2.2, 2.0, 1.9, 1.8], [2.4, 1.7, 1.9])
    out = tmp_path / "loss.png"
    r = check_ok(invoke("plot", run, "-o", out))
    assert r.output == f"runA: 30 steps, best validation loss 1.7000 at step 20\nwrote {out}\n"
    assert png_size(out.read_bytes()) == (800, 500)


def test_svg_overlays_runs_with_labels_and_the_best_points(tmp_path):
    a = new_style(tmp_path / "small", [3.0, 2.5, 2.2, 2.0], [2.4, 2.1])
    b = new_style(tmp_path / "big", [3.0, 2.0, 1.5, 1.2, 1.1, 1.0], [1.9, 1.25, 1.3])
    out = tmp_path / "ab.svg"
    check_ok(invoke("plot", a, b / "metrics.jsonl", "--x", "tokens", "-o", out, "--title", "two runs"))
    texts = svg_texts(out)
    for label in ("small train", "small validation", "big train", "big validation", "two runs", "tokens seen",
                  "best 2.1000 (step 20)", "best 1.2500 (step 20)"):
        assert label in texts, (label, texts)


def test_a_run_past_its_best_is_shaded(tmp_path):
    """Evaluations after the best that never beat it: the plot marks that stretch (the run
    went past its best); a run whose last evaluation is its best has no such band."""
    a = new_style(tmp_path / "over", [3.0, 2.5, 2.2, 2.0, 1.9, 1.8], [2.4, 1.7, 1.9])
    b = new_style(tmp_path / "fine", [3.0, 2.5, 2.2, 2.0], [2.4, 2.1])
    out = tmp_path / "ab.svg"
    check_ok(invoke("plot", a, b, "-o", out))
    texts = svg_texts(out)
    assert "over past its best" in texts and "fine past its best" not in texts


def test_same_folder_names_are_labelled_by_path(tmp_path):
    a = new_style(tmp_path / "x" / "run", [3.0, 2.0], [2.5])
    b = new_style(tmp_path / "y" / "run", [3.0, 2.1], [2.6])
    out = tmp_path / "p.svg"
    r = check_ok(invoke("plot", a, b, "-o", out))
    assert f"{a} validation" in svg_texts(out) and f"{b}: 10 steps" in r.output


def test_an_old_metrics_file_plots(tmp_path):
    """No "type", whole epochs and no tokens or elapsed on evaluation lines, and elapsed restarted
    by a resume after step 10: evaluations are placed by step, elapsed made cumulative."""
    lines = [
        {"step": 5, "epoch": 0.05, "train_loss": 3.0, "tokens": 500, "elapsed": 5.0},
        {"step": 10, "epoch": 0.1, "train_loss": 2.5, "tokens": 1000, "elapsed": 10.0},
        {"step": 10, "epoch": 0, "val_loss": 2.6, "best_val_loss": 2.6},
        {"step": 15, "epoch": 0.15, "train_loss": 2.2, "tokens": 1500, "elapsed": 4.0},  # resumed at step 10
        {"step": 20, "epoch": 0.2, "train_loss": 2.0, "tokens": 2000, "elapsed": 9.0},
        {"step": 20, "epoch": 0, "val_loss": 2.3, "best_val_loss": 2.3},
        '{"step": 25, "epoch": 0.25, "train_lo',  # torn by a kill
    ]
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(m if isinstance(m, str) else json.dumps(m) for m in lines) + "\n")
    c = curves(run, "seconds")
    numpy.testing.assert_array_equal(c.train[0], [5, 10, 14, 19])
    numpy.testing.assert_array_equal(c.val[0], [10, 19])
    assert c.best == (19.0, 2.3, 20)
    c = curves(run, "tokens")
    numpy.testing.assert_array_equal(c.val[0], [1000, 2000])
    check_ok(invoke("plot", run, "--x", "seconds", "-o", tmp_path / "old.png"))


def test_a_real_run(tmp_path):
    out = tmp_path / "run"
    check_ok(train(write_corpus(tmp_path), out, "--max-steps", 30, "--log-every", 5, "--eval-every", 10))
    vals = [(m["val_loss"], m["step"]) for m in metrics(out) if m["type"] == "eval"]
    best = min(vals)
    for x in ("steps", "tokens", "seconds"):
        r = check_ok(invoke("plot", out, "--x", x, "-o", tmp_path / f"{x}.png"))
        assert f"run: 30 steps, best validation loss {best[0]:.4f} at step {best[1]}" in r.output
        assert png_size((tmp_path / f"{x}.png").read_bytes()) == (800, 500)


def test_errors(tmp_path, monkeypatch):
    run = new_style(tmp_path / "run", [3.0, 2.0], [2.5])
    check_error(invoke("plot", tmp_path / "nothing"), 1, "nothing", "no such file or run folder")
    check_error(invoke("plot", tmp_path), 1, "holds no metrics.jsonl")
    check_error(invoke("plot", run, "-o", tmp_path / "loss.jpg"), 2, "loss.jpg", ".png or .svg")
    check_error(invoke("plot"), 2, "RUNS")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    check_error(invoke("plot", tmp_path / "empty", "-o", tmp_path / "e.png"), 1, "holds no training or validation loss")
    write_metrics(tmp_path / "steps-only", [{"step": 1, "train_loss": 2.0}])
    check_error(invoke("plot", tmp_path / "steps-only", "--x", "seconds", "-o", tmp_path / "s.png"), 1,
                "no line holds elapsed")
    check_error(invoke("plot", run, "-o", tmp_path / "no-folder" / "p.png"), 1, "cannot write")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    check_error(invoke("plot", run, "-o", tmp_path / "p.png"), 1, "pip install 'charnn[plot]'")
    assert not (tmp_path / "p.png").exists()
