"""Reading a run's metrics.jsonl into loss curves (what charnn plot draws).

Each line is one JSON object (training/folder.py writes them):

    {"type": "train", "step", "epoch", "tokens", "elapsed", "train_loss", "tokens_per_second", "lr"}
    {"type": "eval",  "step", "epoch", "tokens", "elapsed", "val_loss", "best_val_loss", ...}

Files written before the record type and the evaluation lines' tokens and elapsed time were kept
still read: a line without "type" is an evaluation when it has "val_loss" and a training line
when it has "train_loss", and an x value a line lacks (tokens, seconds) is interpolated by step
from the lines that have it. Their elapsed time restarted at each resume; it is made cumulative.
A line torn by a kill (not JSON) is skipped, as training's resume skips it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy

from .fileio import file_kind

METRICS_NAME = "metrics.jsonl"
# --x choice -> the field of a line that holds it
X_FIELDS = {"steps": "step", "tokens": "tokens", "seconds": "elapsed"}


class MetricsError(Exception):
    """A metrics file cannot be read or holds no loss; the message names the path."""


@dataclass
class Curves:
    """One run's losses against the chosen x: (x, loss) arrays for training and evaluation lines,
    and the best evaluation (x, loss, step), or None without evaluations."""

    path: Path
    train: tuple
    val: tuple
    best: tuple | None
    steps: int


def metrics_path(run) -> Path:
    """A run folder's metrics.jsonl, or the file itself."""
    p = Path(run)
    if p.is_dir():
        p = p / METRICS_NAME
        if not p.exists():
            raise MetricsError(f"{run}: the folder holds no {METRICS_NAME}")
    elif not p.exists():
        raise MetricsError(f"{run}: no such file or run folder")
    kind = file_kind(p)
    if kind:
        raise MetricsError(f"{p}: is {kind}, not a regular file")
    return p


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics file, each with a "type" ("train", "eval" or its own)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MetricsError(f"{path}: not valid UTF-8 at byte {e.start} (not a charnn metrics file)") from None
    except OSError as e:
        raise MetricsError(f"{path}: cannot read: {e.strerror or e}") from None
    records, offset, last = [], 0.0, None
    for line in text.splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if not isinstance(m, dict) or not _number(m.get("step")):
            continue
        if "type" not in m:  # a file of an older charnn
            m = dict(m, type="eval" if "val_loss" in m else "train" if "train_loss" in m else None)
            if _number(m.get("elapsed")):
                if last is not None and m["elapsed"] + offset < last:
                    offset = last  # the elapsed time of a resumed process restarted at zero
                m["elapsed"] += offset
                last = m["elapsed"]
        records.append(m)
    return records


def curves(run, x: str = "steps") -> Curves:
    """The loss curves of a run folder or metrics file against ``x`` (steps, tokens or seconds).

    Raises:
        MetricsError: the file is missing or unreadable, holds no loss, or no line holds ``x``.
    """
    path = metrics_path(run)
    records = read_records(path)
    train = [m for m in records if m["type"] == "train" and _number(m.get("train_loss"))]
    val = [m for m in records if m["type"] == "eval" and _number(m.get("val_loss"))]
    if not train and not val:
        raise MetricsError(f"{path}: holds no training or validation loss (not a charnn metrics file?)")
    field = X_FIELDS[x]
    known = sorted((m["step"], m[field]) for m in train + val if _number(m.get(field)))
    if not known:
        raise MetricsError(f"{path}: no line holds {field} (an older file?); plot against steps")
    ks, kx = numpy.array(known, dtype=float).T

    def xs(ms):
        return numpy.array([m[field] if _number(m.get(field)) else numpy.interp(m["step"], ks, kx) for m in ms],
                           dtype=float)

    def series(ms, key):
        return xs(ms), numpy.array([m[key] for m in ms], dtype=float)

    vx, vy = series(val, "val_loss")
    best = None
    if len(vy):
        i = int(numpy.argmin(vy))
        best = (float(vx[i]), float(vy[i]), val[i]["step"])
    steps = max(m["step"] for m in train + val)
    return Curves(path, series(train, "train_loss"), (vx, vy), best, steps)


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)
