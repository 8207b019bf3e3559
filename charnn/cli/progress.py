"""Showing training progress on stderr: a rich live display on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ..train import Reporter
from ..wording import plural


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
        self.console.print(
            f"charnn train: {cfg.cell} {cfg.layers}x{cfg.hidden}, {plural(info['params'], 'parameter')}, "
            f"vocabulary {plural(info['vocab_size'], cfg.level)}, {info['train_tokens']:,} training and "
            f"{plural(info['val_tokens'], 'validation token')}, {plural(info['chunks_per_epoch'], 'step')} per epoch, "
            f"{info['device']}, run folder {info['out']}"
            + (f", resuming at step {info['step']}" if info["step"] else ""), highlight=False, markup=False, soft_wrap=True)
        if self.live:
            self.progress = Progress(
                TextColumn("step {task.completed:>7.0f}"), BarColumn(bar_width=24),
                TextColumn("epoch {task.fields[epoch]:.2f}  train {task.fields[train]}  val {task.fields[val]}  "
                           "{task.fields[speed]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=info["step"], epoch=0.0,
                                               train="-", val="-", speed="-")

    def _loss_text(self, loss: float | None) -> str:
        if loss is None:
            return "-"
        if self.level == "char":
            return f"{loss:.3f} ({loss / math.log(2):.2f} bpc)"
        return f"{loss:.3f} (ppl {math.exp(min(loss, 700)):.1f})"

    def log(self, m: dict):
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=m["step"], epoch=m["epoch"], train=self._loss_text(m["train_loss"]),
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
            self.progress.update(self.task, val=text)
        self.console.print(f"step {m['step']}  val {text}  best {m['best_val_loss']:.4f}", highlight=False)
        if sample:
            shown = sample.strip("\n")[:400]
            self.console.print("  sample: " + shown.replace("\n", "\n          "), highlight=False, markup=False)

    def message(self, text: str):
        self.console.print(text, highlight=False, markup=False)

    def end(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
