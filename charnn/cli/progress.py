"""Showing progress on stderr: a rich live display on a terminal, plain lines (training) or
nothing (score, gradcheck) otherwise. Training's reporter is in train_progress.py (it imports the
training package, which score and gradcheck do not need).

Both displays fit the terminal's width: a line wider than the terminal would be cut by rich (in
80 columns training's line once lost its step, its bar and its ETA), so FittedProgress tries
layouts from the richest to the barest and keeps the first that fits, the bar shrinking first.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

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
        self.display = None
        if self.enabled:
            self.display = FittedProgress(
                (TextColumn("{task.description}"), BarColumn(), CountColumn(unit), RateColumn(unit), EtaColumn()),
                (BarColumn(), CountColumn(unit), EtaColumn()),
                (CountColumn(unit), EtaColumn()),
                console=self.console, transient=True)
            self.task = self.display.add_task(description, total=None)

    def __call__(self, done: int, total: int | None = None, description: str | None = None):
        if not self.enabled:
            return
        fields = {"completed": done}
        if total is not None:
            fields["total"] = total
        if description is not None:
            fields["description"] = description
        self.display.update(self.task, **fields)
        if not self.started and self.clock() - self.t0 >= self.delay:
            self.display.start()
            self.started = True

    def close(self):
        if self.started:
            self.display.stop()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
