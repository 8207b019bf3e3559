"""Training's progress on stderr (charnn train): a live line on a terminal, plain lines
otherwise; the columns and their fitting to the terminal's width are progress.py's."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

from ..nn.functional import perplexity
from ..train import Reporter
from ..wording import plural
from .common import compile_notice
from .progress import EtaColumn, FittedProgress


class ConsoleReporter(Reporter):
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.display = None
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
            self.display = FittedProgress(*training_layouts(), console=self.console, transient=False)
            self.display.start()
            # The time limit counts this process, from about now (Trainer.run starts its clock
            # just before calling start).
            deadline = None if cfg.time_limit is None else time.perf_counter() + cfg.time_limit
            self.task = self.display.add_task("train", total=self.total, completed=info["step"], epoch=0.0,
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
        if self.display is not None:
            self.display.update(self.task, completed=m["step"], epoch=m["epoch"], train=self._loss_text(m["train_loss"]),
                                 train_short=self._loss_text(m["train_loss"], short=True),
                                 speed=f"{m['tokens_per_second']:,.0f}")
        else:
            # A line a log: one line however long (rich would wrap it at 80 columns off a terminal).
            self.console.print(f"step {m['step']}  epoch {m['epoch']:.2f}  train {self._loss_text(m['train_loss'])}  "
                               f"{m['tokens_per_second']:,.0f} tok/s  lr {m['lr']:.3g}  {time.strftime('%H:%M:%S')}",
                               highlight=False, markup=False, soft_wrap=True)

    def evaluation(self, m: dict, sample: str | None):
        if self.quiet:
            return
        text = self._loss_text(m["val_loss"])
        if self.display is not None:
            self.display.update(self.task, val=text, val_short=self._loss_text(m["val_loss"], short=True))
        self.console.print(f"step {m['step']}  val {text}  best {m['best_val_loss']:.4f}", highlight=False,
                           soft_wrap=not self.live)
        if sample:
            shown = sample.strip("\n")[:400]
            self.console.print("  sample: " + shown.replace("\n", "\n          "), highlight=False, markup=False,
                               soft_wrap=not self.live)

    def message(self, text: str):
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)  # the terminal wraps it

    def end(self):
        if self.display is not None:
            self.display.stop()
            self.display = None


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
