"""`charnn plot`: training and validation loss of one or more runs, as a PNG or SVG file."""

from __future__ import annotations

from pathlib import Path

import click

from ..io.metrics import MetricsError, curves
from ..plot import FORMATS, PlotError, matplotlib_available, render, write_plot
from .common import fail
from .options import valid_text


def shown(text) -> str:
    """A path or name for display: bytes that are not UTF-8 (kept by Python as lone
    surrogates, which no output stream can write) shown as U+FFFD."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def labels(runs) -> list[str]:
    """Each run's folder name, or the path as given where two folder names are the same."""
    names = [Path(r).name if Path(r).is_dir() else Path(r).resolve().parent.name for r in runs]
    return [shown(n if names.count(n) == 1 and n else str(r)) for n, r in zip(names, runs)]


def run_plot(runs, out, x, title):
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise click.BadParameter(f"{shown(out)}: name a .png or .svg file", param_hint="'-o' / '--out'")
    if not matplotlib_available():
        fail("charnn plot needs matplotlib: pip install 'charnn[plot]'")
    try:
        found = [(label, curves(run, x)) for label, run in zip(labels(runs), runs)]
        data, note = render(found, x, title, fmt=fmt)
        write_plot(out, data)
    except (MetricsError, PlotError) as e:
        fail(shown(e))
    if note:
        click.echo(f"charnn plot: {note}", err=True)
    for label, c in found:
        best = "no validation loss" if c.best is None else f"best validation loss {c.best[1]:.4f} at step {c.best[2]}"
        click.echo(f"{label}: {c.steps} steps, {best}")
    click.echo(f"wrote {shown(out)}")


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", default="loss.png", show_default=True, type=click.Path(dir_okay=False),
              help="The image file: .png or .svg.")
@click.option("--x", "x", type=click.Choice(["steps", "tokens", "seconds"]), default="steps", show_default=True,
              help="The horizontal axis: training steps, tokens seen, or elapsed seconds (resumes included).")
@click.option("--title", default=None, callback=valid_text,
              help="The plot's title [charnn training]; mathtext between $ signs, drawn as typed where "
                   "matplotlib cannot read it.")
def plot_command(runs, out, x, title):
    """Plot training and validation loss of RUN [RUN...] (run folders or their metrics.jsonl),
    overlaid, the best validation point of each starred. Needs matplotlib: pip install 'charnn[plot]'.

    \b
      charnn plot models/default                       loss.png
      charnn plot runs/a runs/b --x seconds -o ab.svg  two runs against time
    """
    run_plot(runs, out, x, title)
