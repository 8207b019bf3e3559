"""Reading a run's metrics.jsonl into loss curves (what charnn plot draws).

Each line is one JSON object (training/folder.py writes them):

    {"type": "train", "step", "epoch", "tokens", "elapsed", "train_loss", "tokens_per_second", "lr"}
    {"type": "eval",  "step", "epoch", "tokens", "elapsed", "val_loss", "best_val_loss", ...}

Files written before the record type and the evaluation lines' tokens and elapsed time were kept
still read: a line without "type" is an evaluation when it has "val_loss" and a training line
when it has "train_loss", and an x value a line lacks (tokens, seconds) is interpolated by step
from the lines that have it. Their elapsed time restarted at each resume; it is made cumulative.
A line torn by a kill (not JSON) is skipped, as training's resume skips it.

What a line holds is checked before it is used, since the file may come from anywhere: a line
is read at most MAX_LINE bytes at a time (a longer one is refused, never held whole), a step
is an integer from 0 to MAX_STEP, tokens and seconds are finite numbers from 0 to MAX_X, and
a loss a finite number from 0 to MAX_LOSS. A line that breaks one of these is refused with its
file, line number and field; nothing reaches the plot that matplotlib cannot place on an axis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy

from .fileio import file_kind

METRICS_NAME = "metrics.jsonl"
MAX_LINE = 1 << 16  # bytes; charnn's lines hold a few hundred
MAX_STEP = 10**15
MAX_X = 1e18  # tokens seen, elapsed seconds
MAX_LOSS = 1e6  # nats per token (training stops a run above 2 ln V, some 30 for a million words)
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


def read_lines(path: Path):
    """(line number, text) of each line of a metrics file (newline dropped), read a line at a
    time and at most MAX_LINE bytes of it, so a line of any length costs no more than that.

    Raises:
        MetricsError: unreadable, a line longer than MAX_LINE bytes, or one that is not UTF-8
            (each naming the file and the line).
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise MetricsError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        n, offset = 0, 0
        while True:
            try:
                raw = f.readline(MAX_LINE + 1)
            except OSError as e:
                raise MetricsError(f"{path}: cannot read: {e.strerror or e}") from None
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE:
                raise MetricsError(f"{path}: line {n} is longer than {MAX_LINE:,} bytes (charnn writes lines of a "
                                   f"few hundred); not a charnn metrics file")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MetricsError(f"{path}: not valid UTF-8 at byte {offset + e.start} (line {n}); "
                                   f"not a charnn metrics file") from None
            offset += len(raw)
            yield n, text.rstrip("\r\n")


def parse_line(text: str):
    """The JSON value of a line, or None for one that is not JSON (torn by a kill) or nests
    deeper than the parser's stack."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


# field -> (its kind, for the message; whether a value is valid)
_FIELDS = {
    "step": ("an integer from 0 to 10^15", lambda v: type(v) is int and 0 <= v <= MAX_STEP),  # noqa: E721
    "tokens": ("a number from 0 to 10^18", lambda v: _number(v) and 0 <= v <= MAX_X),
    "elapsed": ("a number of seconds from 0 to 10^18", lambda v: _number(v) and 0 <= v <= MAX_X),
    "train_loss": ("a loss from 0 to 10^6", lambda v: _number(v) and 0 <= v <= MAX_LOSS),
    "val_loss": ("a loss from 0 to 10^6", lambda v: _number(v) and 0 <= v <= MAX_LOSS),
}


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics file, each with a "type" ("train", "eval" or its own).

    Raises:
        MetricsError: a line over MAX_LINE bytes, not UTF-8, or with a step, tokens, elapsed
            time or loss out of range (module docstring), naming the file, line and field.
    """
    records, offset, last = [], 0.0, None
    for n, line in read_lines(path):
        m = parse_line(line)
        if not isinstance(m, dict) or "step" not in m:
            continue
        for key, (kind, ok) in _FIELDS.items():
            if key in m and m[key] is not None and not ok(m[key]):
                raise MetricsError(f"{path}: line {n}: {key} is {_shown(m[key])}, not {kind}; not a charnn metrics file")
        if "type" not in m:  # a file of an older charnn
            m = dict(m, type="eval" if "val_loss" in m else "train" if "train_loss" in m else None)
            if _number(m.get("elapsed")):
                if last is not None and m["elapsed"] + offset < last:
                    offset = last  # the elapsed time of a resumed process restarted at zero
                m["elapsed"] += offset
                last = m["elapsed"]
        records.append(m)
    return records


def _shown(v) -> str:
    """A value for a message, at most 40 characters (a 4,000-digit step is shown by its length)."""
    if type(v) is int and abs(v) >= 10**30:  # noqa: E721  (str() of a huge int is slow and long)
        return f"an integer of {len(str(abs(v))):,} digits"
    try:
        text = json.dumps(v)
    except (ValueError, TypeError, RecursionError):
        text = str(type(v).__name__)
    return text if len(text) <= 40 else text[:37] + "..."


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
