"""`charnn train`: turns options into a TrainConfig, runs the Trainer, reports errors as one line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..backend import BackendError
from ..io.checkpoint import CheckpointError
from ..io.data import CorpusError
from ..nn.model import FORGET_BIAS, ModelError
from ..train import TrainConfig, Trainer, TrainError
from ..io.vocab import VocabError
from .common import json_line, regular_file


def default_out(corpus: str, opts: dict) -> Path:
    stem = Path(corpus).stem or "corpus"
    return Path("models") / f"{stem}-{opts['cell']}-{opts['layers']}x{opts['hidden']}"


def run_train(corpus, val_path, out, resume, as_json, quiet, explicit, opts):
    if corpus is None and not resume:
        raise click.UsageError("missing CORPUS (a text file to train on)")
    if resume and out is None and corpus is None:
        raise click.UsageError("--resume needs --out (the run folder) or the CORPUS of a default run folder")
    if opts["tie"] and opts["embed"] != opts["hidden"]:
        raise click.BadParameter("--tie needs --embed equal to --hidden", param_hint="--tie")
    for path in (corpus, val_path):
        if path is not None:
            regular_file(path)  # a FIFO would be opened by the corpus digest and wait for a writer
    if opts["cell"] != "lstm" and opts["forget_bias"] != FORGET_BIAS:
        raise click.BadParameter("applies to --cell lstm only", param_hint="--forget-bias")
    if opts["max_epochs"] is None and opts["max_steps"] is None and opts["time_limit"] is None:
        opts["max_epochs"] = 10
    out_dir = Path(out) if out else default_out(corpus, opts)
    cfg = TrainConfig(corpus=str(corpus) if corpus else "", val=val_path, out=str(out_dir), **opts)
    overrides = {}
    if resume:
        # Only what the user typed is compared with (or overrides) the checkpoint's settings.
        overrides = {k: getattr(cfg, "val" if k == "val_path" else k) for k in explicit}
        overrides = {("val" if k == "val_path" else k): v for k, v in overrides.items()}
        if corpus:
            overrides["corpus"] = str(corpus)
        overrides["out"] = str(out_dir)
    reporter = None
    if not quiet:
        from .progress import ConsoleReporter

        reporter = ConsoleReporter()
    trainer = Trainer(cfg, out_dir, resume=resume, reporter=reporter, overrides=overrides)
    try:
        result = trainer.run()
    except (TrainError, CorpusError, CheckpointError, BackendError, ModelError, VocabError) as e:
        if reporter:
            reporter.end()
        raise click.ClickException(str(e)) from None
    except OSError as e:
        if reporter:
            reporter.end()
        raise click.ClickException(f"{out_dir}: {e.strerror or e}") from None
    except KeyboardInterrupt:  # before the loop's own handler (cli.Group exits 130)
        if reporter:
            reporter.end()
        raise
    if as_json:
        click.echo(json_line(result), nl=False)
    elif not quiet and result["stopped"] != "interrupted":
        val, best = result["val_loss"], result["best_val_loss"]
        if best is not None and val is not None and best < val:
            # model.npz holds the best evaluation, not the last
            said = f", best validation loss {best:.4f} nats/token (the last evaluation {val:.4f})"
        else:
            said = f", validation loss {val:.4f} nats/token" if val is not None else ""
        click.echo(f"saved {result['model']} after {result['steps']} steps ({result['tokens_per_second']:,.0f} tokens/s)"
                   + said, err=True)
    if result["stopped"] == "interrupted":
        click.echo(f"interrupted: checkpoint saved to {result['checkpoint']}; continue with --resume --out {out_dir}", err=True)
        sys.exit(130)
