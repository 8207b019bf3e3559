"""Showing progress on stderr: a rich live display on a terminal, plain lines (training) or
nothing (score, gradcheck) otherwise.

Both displays fit the terminal's width: a line wider than the terminal would be cut by rich (in
80 columns training's line once lost its step, its bar and its ETA), so FittedProgress tries
layouts from the richest to the barest and keeps the first that fits, the bar shrinking first.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.measure import Measurement
from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from ..nn.functional import perplexity
from ..train import Reporter
from ..wording import plural
from .common import compile_notice

BAR_WIDTH = 24
MIN_BAR_WIDTH = 8


class EtaColumn(TimeRemainingColumn):
    """"ETA 0:01:23": rich's remaining time, or the time left before the task's ``deadline``
    field (a time.perf_counter() value: training's --time-limit) when that comes sooner."""

    def render(self, task) -> Text:
        text = super().render(task)
        deadline = task.fields.get("deadline")
        if deadline is not None:
            left = max(0.0, deadline - time.perf_counter())
            if task.total is None or task.time_remaining is None or left < task.time_remaining:
                minutes, seconds = divmod(int(left), 60)
                text = Text(f"{minutes // 60:d}:{minutes % 60:02d}:{seconds:02d}", style="progress.remaining")
        return Text("ETA ", style="progress.remaining") + text


class FittedProgress(Progress):
    """A Progress that shows the first of ``layouts`` (tuples of columns, richest first) whose
    line fits the console's width; a layout's BarColumn (bar_width=None in it) takes the room left,
    BAR_WIDTH at most and MIN_BAR_WIDTH at least. The last layout is shown when none fits."""

    def __init__(self, *layouts, **kwargs):
        self.layouts = layouts
        super().__init__(*layouts[0], **kwargs)

    def _width(self, columns, tasks) -> int:
        options = self.console.options
        width = len(columns) - 1  # the grid's padding between columns
        for column in columns:
            if isinstance(column, BarColumn):
                continue
            width += max((Measurement.get(self.console, options, column(task)).maximum for task in tasks
                          if task.visible), default=0)
        return width

    def make_tasks_table(self, tasks):
        tasks = list(tasks)
        if not tasks or not hasattr(self, "live"):  # rich renders once inside __init__, before self.live
            return super().make_tasks_table(tasks)
        room = self.console.width
        for columns in self.layouts:
            bars = [c for c in columns if isinstance(c, BarColumn)]
            free = room - self._width(columns, tasks)
            if free >= MIN_BAR_WIDTH * len(bars):
                break
        for bar in bars:
            bar.bar_width = max(MIN_BAR_WIDTH, min(BAR_WIDTH, free // max(1, len(bars))))
        self.columns = columns
        return super().make_tasks_table(tasks)


class ConsoleReporter(Reporter):
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.progress = None
        self.task = None
        self.level = "char"
        self.last_val = None

    def start(self, info: dict):
        cfg = info["config"]
        self.level = cfg.level
        self.total = cfg.max_steps
        if cfg.max_epochs is not None:
            steps = cfg.max_epochs * info["chunks_per_epoch"]
            self.total = steps if self.total is None else min(self.total, steps)
        if self.quiet:
            return
        # On a terminal rich wraps the header at word boundaries; elsewhere (a log file) it
        # stays one line.
        self.console.print(
            f"charnn train: {cfg.cell} {cfg.layers}x{cfg.hidden}, {plural(info['params'], 'parameter')}, "
            f"vocabulary {plural(info['vocab_size'], cfg.level)}, {info['train_tokens']:,} training and "
            f"{plural(info['val_tokens'], 'validation token')}, {plural(info['chunks_per_epoch'], 'step')} per epoch, "
            f"{info['device']}, run folder {info['out']}"
            + (f", resuming at step {info['step']}" if info["step"] else ""), highlight=False, markup=False,
            soft_wrap=not self.live)
        if self.live:
            compile_notice(str(info["device"]).split()[0], console=self.console)
            self.progress = FittedProgress(*training_layouts(), console=self.console, transient=False)
            self.progress.start()
            # The time limit counts this process, from about now (Trainer.run starts its clock
            # just before calling start).
            deadline = None if cfg.time_limit is None else time.perf_counter() + cfg.time_limit
            self.task = self.progress.add_task("train", total=self.total, completed=info["step"], epoch=0.0,
                                               train="-", val="-", train_short="-", val_short="-", speed="-",
                                               deadline=deadline)

    def _loss_text(self, loss: float | None, short: bool = False) -> str:
        if loss is None:
            return "-"
        if short:
            return f"{loss:.3f}"
        if self.level == "char":
            return f"{loss:.3f} ({loss / math.log(2):.2f} bpc)"
        return f"{loss:.3f} (ppl {perplexity(loss):.1f})"

    def log(self, m: dict):
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=m["step"], epoch=m["epoch"], train=self._loss_text(m["train_loss"]),
                                 train_short=self._loss_text(m["train_loss"], short=True),
                                 speed=f"{m['tokens_per_second']:,.0f}")
        else:
            self.console.print(f"step {m['step']}  epoch {m['epoch']:.2f}  train {self._loss_text(m['train_loss'])}  "
                               f"{m['tokens_per_second']:,.0f} tok/s  lr {m['lr']:.3g}  {time.strftime('%H:%M:%S')}",
                               highlight=False)

    def evaluation(self, m: dict, sample: str | None):
        if self.quiet:
            return
        text = self._loss_text(m["val_loss"])
        if self.progress is not None:
            self.progress.update(self.task, val=text, val_short=self._loss_text(m["val_loss"], short=True))
        self.console.print(f"step {m['step']}  val {text}  best {m['best_val_loss']:.4f}", highlight=False)
        if sample:
            shown = sample.strip("\n")[:400]
            self.console.print("  sample: " + shown.replace("\n", "\n          "), highlight=False, markup=False)

    def message(self, text: str):
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)  # the terminal wraps it

    def end(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def training_layouts() -> list[tuple]:
    """Training's columns, from all of them (about 130 columns) to the step, the training loss
    and the ETA (about 40): the elapsed time, the epoch, the speed, the bar, the bits or
    perplexity and the validation loss go, in that order."""
    step = TextColumn("step {task.completed:>7.0f}")
    epoch = TextColumn("epoch {task.fields[epoch]:.2f}")
    train, val = TextColumn("train {task.fields[train]}"), TextColumn("val {task.fields[val]}")
    train_short, val_short = TextColumn("train {task.fields[train_short]}"), TextColumn("val {task.fields[val_short]}")
    speed = TextColumn("{task.fields[speed]} tok/s")
    eta = EtaColumn()
    return [
        (step, BarColumn(), epoch, train, val, speed, TimeElapsedColumn(), eta),
        (step, BarColumn(), epoch, train, val, speed, eta),
        (step, BarColumn(), train, val, speed, eta),
        (step, BarColumn(), train, val, eta),
        (step, train, val, eta),
        (step, train_short, val_short, eta),
        (step, train_short, eta),
    ]


class CountColumn(ProgressColumn):
    """"1,234/5,000 lines"."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        total = "?" if task.total is None else f"{task.total:,.0f}"
        return Text(f"{task.completed:,.0f}/{total} {self.unit}", style="progress.download")


class RateColumn(ProgressColumn):
    """"2,345 lines/s"."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


class WorkProgress:
    """A transient progress bar on stderr for a job of known size (score's lines or tokens,
    gradcheck's checks), given to the library as its ``progress(done, total)`` callback.

    Nothing is shown under ``quiet`` or when stderr is not a terminal (a pipe, a log file,
    CliRunner), nor before the job has run ``delay`` seconds, so a quick job prints nothing; the
    bar is erased when the job ends, leaving stderr as it was. A context manager.
    """

    def __init__(self, description: str, unit: str, quiet: bool = False, console: Console | None = None,
                 delay: float = 0.5, clock=time.monotonic):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal and not quiet
        self.delay, self.clock, self.t0 = delay, clock, clock()
        self.started = False
        self.task = None
        self.progress = None
        if self.enabled:
            self.progress = FittedProgress(
                (TextColumn("{task.description}"), BarColumn(), CountColumn(unit), RateColumn(unit), EtaColumn()),
                (BarColumn(), CountColumn(unit), EtaColumn()),
                (CountColumn(unit), EtaColumn()),
                console=self.console, transient=True)
            self.task = self.progress.add_task(description, total=None)

    def __call__(self, done: int, total: int | None = None, description: str | None = None):
        if not self.enabled:
            return
        fields = {"completed": done}
        if total is not None:
            fields["total"] = total
        if description is not None:
            fields["description"] = description
        self.progress.update(self.task, **fields)
        if not self.started and self.clock() - self.t0 >= self.delay:
            self.progress.start()
            self.started = True

    def close(self):
        if self.started:
            self.progress.stop()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
