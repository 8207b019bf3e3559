"""Loss curves of training runs as a PNG or SVG image, through matplotlib (an optional extra).

matplotlib is imported here alone, when a plot is drawn, and only its Agg canvas is used (a
Figure with no pyplot and no display), so a plot draws the same on a server as on a laptop.
"""

from __future__ import annotations

import io
from pathlib import Path

from .io.fileio import atomic_write_bytes
from .io.metrics import Curves

FORMATS = {".png": "png", ".svg": "svg"}
X_LABELS = {"steps": "step", "tokens": "tokens seen", "seconds": "elapsed seconds"}


class PlotError(Exception):
    """A plot cannot be drawn or written; one line for the user."""


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def literal(text: str) -> str:
    """``text`` as matplotlib shows it as typed: every "$" escaped, so no part is read as
    mathtext (matplotlib drops the backslashes of a text without math)."""
    return text.replace("$", r"\$")


def render(runs: list[tuple[str, Curves]], x: str, title: str | None = None, fmt: str = "png") -> tuple:
    """:func:`draw`, with a title that matplotlib's mathtext cannot parse (``$\\frac{$``) drawn
    as typed instead, and any other error of matplotlib's as a PlotError.

    Returns:
        (the file's bytes, a note for the user or None).
    """
    try:
        return draw(runs, x, title, fmt=fmt), None
    except Exception as e:  # noqa: BLE001 - matplotlib's errors are of many types; one line for each
        if not title or "$" not in title:
            raise PlotError(f"matplotlib cannot draw the plot: {_one_line(e)}") from None
    try:
        data = draw(runs, x, literal(title), fmt=fmt)
    except Exception as e:  # noqa: BLE001
        raise PlotError(f"matplotlib cannot draw the plot: {_one_line(e)}") from None
    return data, "the title is not mathtext matplotlib can read; drawn as typed"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def draw(runs: list[tuple[str, Curves]], x: str, title: str | None = None, width: float = 8.0,
         height: float = 5.0, dpi: int = 100, fmt: str = "png") -> bytes:
    """The image of ``runs`` (label, curves): training loss as a thin line, validation loss as a
    line with dots in the same colour, the best validation point of each run starred and labelled.
    Labels are drawn as typed (a folder name is never read as mathtext); the title may hold
    mathtext between "$" signs.

    Returns:
        The PNG or SVG file's bytes (``fmt``), ``width`` x ``height`` inches at ``dpi``.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # SVG text stays text (searchable, small); no date in the file, so the same runs give the same file.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "charnn"}):
        fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        best = []
        for i, (label, c) in enumerate(runs):
            label = literal(label)
            colour = colours[i % len(colours)]
            if len(c.train[0]):
                ax.plot(*c.train, color=colour, linewidth=0.8, alpha=0.55, label=f"{label} train")
            if len(c.val[0]):
                ax.plot(*c.val, color=colour, linewidth=1.8, marker="o", markersize=3, label=f"{label} validation")
            if c.best is not None:
                bx, by, step = c.best
                ax.plot([bx], [by], marker="*", markersize=14, color=colour, markeredgecolor="black", zorder=5)
                best.append((bx, by, step, colour))
                last = c.val[0][-1] if len(c.val[0]) else bx
                if last > bx:  # evaluations after the best that never beat it: the run went past its best
                    ax.axvspan(bx, last, color=colour, alpha=0.08, label=f"{label} past its best")
        left, right = ax.get_xlim()
        for bx, by, step, colour in best:  # the label on the side with more room
            on_left = bx > (left + right) / 2
            ax.annotate(f"best {by:.4f} (step {step})", (bx, by), xytext=(-8 if on_left else 8, 10),
                        textcoords="offset points", ha="right" if on_left else "left", fontsize=8, color=colour)
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title or "charnn training")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def write_plot(path, data: bytes):
    try:
        atomic_write_bytes(Path(path), data)
    except OSError as e:
        raise PlotError(f"cannot write {path}: {e.strerror or e}") from None
