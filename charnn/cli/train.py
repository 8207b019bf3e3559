"""`charnn train`: turns options into a TrainConfig, runs the Trainer, reports errors as one line.

Under ``mpiexec -n K`` (dist.py) every rank runs this; rank 0 alone reports. An error every rank
agrees on (a bad option, a failed save) is said once, by rank 0, and every rank exits with its
status; any other error on any rank ends the whole job at once (``charnn: rank R: ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..backend import BackendError
from ..dist import DistError, PeerStopped, RankError, env_rank, world_from_env
from ..io.checkpoint import CheckpointError
from ..memory import MemoryLimitError
from ..io.data import CorpusError
from ..nn.model import FORGET_BIAS, INPUT_SCALE, ModelError
from ..nn.optim import weight_decay_problem
from ..finetune import FineTuneError, InitFrom, merge_options
from ..train import Finished, TrainConfig, Trainer, TrainError
from ..io.vocab import VocabError
from .common import fail, json_line, regular_file
from ..wording import plural

STDIN_NAME = "corpus-stdin.txt"  # where a corpus read from stdin is kept in the run folder


def default_out(corpus: str, opts: dict) -> Path:
    stem = "stdin" if corpus == "-" else Path(corpus).stem or "corpus"
    return Path("models") / f"{stem}-{opts['cell']}-{opts['layers']}x{opts['hidden']}"


def run_train(corpus, val_path, out, resume, as_json, quiet, explicit, opts, init_from=None, extend_vocab=False,
              given=None, max_memory=None):
    try:
        world = world_from_env()
    except DistError as e:
        if env_rank() != 0:
            sys.exit(1)  # rank 0 says it
        raise click.ClickException(str(e)) from None
    try:
        return _run(world, corpus, val_path, out, resume, as_json, quiet, explicit, opts, init_from, extend_vocab,
                    given, max_memory)
    except PeerStopped as e:  # (data-parallel only)
        sys.exit(e.code)


def _options(world, corpus, val_path, out, resume, explicit, opts, init_from, extend_vocab, given):
    """Check the options; returns (cfg, out_dir, overrides, init, stdin). Every rank checks them
    and they agree: an error is said once, by rank 0."""
    error = None
    try:
        return _check_options(corpus, val_path, out, resume, explicit, opts, init_from, extend_vocab, given)
    except click.ClickException as e:
        error = e
    finally:
        world.agree(error)


def _check_options(corpus, val_path, out, resume, explicit, opts, init_from, extend_vocab, given):
    if corpus is None and not resume:
        raise click.UsageError("missing CORPUS (a text file to train on)")
    if resume and out is None and corpus is None:
        raise click.UsageError("--resume needs --out (the run folder) or the CORPUS of a default run folder")
    if init_from is not None and resume:
        raise click.UsageError("--init-from starts a new run and --resume continues one; use one of them")
    if extend_vocab and init_from is None:
        raise click.UsageError("--extend-vocab extends the vocabulary of --init-from's model; give --init-from")
    stdin = corpus == "-"
    if stdin:
        if resume:
            raise click.UsageError("--resume reads the corpus the run kept (its corpus-stdin.txt); leave out -")
        if sys.stdin.isatty():
            fail("the corpus is to come from stdin (-), which is a terminal; pipe text in, "
                 "e.g. head -c 50000 corpus.txt | charnn train -")
    init = None
    if init_from is not None:
        try:
            init = InitFrom(init_from, extend_vocab)
            merge_options(opts, explicit | (given or set()), init.ckpt, init.path)
        except FineTuneError as e:
            raise click.ClickException(str(e)) from None
    if opts["tie"] and opts["embed"] != opts["hidden"]:
        raise click.BadParameter("--tie needs --embed equal to --hidden", param_hint="--tie")
    for path in (corpus, val_path):
        if path is not None and not (stdin and path is corpus):
            regular_file(path)  # a FIFO would be opened by the corpus digest and wait for a writer
    problem = weight_decay_problem(opts["optimizer"], opts["lr"], opts["weight_decay"])
    if problem:
        raise click.BadParameter(problem, param_hint="--weight-decay")
    if opts["cell"] != "lstm" and opts["forget_bias"] != FORGET_BIAS:
        raise click.BadParameter("applies to --cell lstm only", param_hint="--forget-bias")
    if opts["embed"] and opts["input_scale"] != INPUT_SCALE:
        raise click.BadParameter("applies to one-hot input (--embed 0) only", param_hint="--input-scale")
    if opts["max_epochs"] is None and opts["max_steps"] is None and opts["time_limit"] is None:
        opts["max_epochs"] = 10
    out_dir = Path(out) if out else default_out(corpus, opts)
    corpus_path = str(out_dir / STDIN_NAME) if stdin else str(corpus) if corpus else ""
    cfg = TrainConfig(corpus=corpus_path, val=val_path, out=str(out_dir), **opts)
    overrides = {}
    if resume:
        # Only what the user typed is compared with (or overrides) the checkpoint's settings.
        overrides = {k: getattr(cfg, "val" if k == "val_path" else k) for k in explicit}
        overrides = {("val" if k == "val_path" else k): v for k, v in overrides.items()}
        if corpus:
            overrides["corpus"] = str(corpus)
        overrides["out"] = str(out_dir)
    return cfg, out_dir, overrides, init, stdin


def _run(world, corpus, val_path, out, resume, as_json, quiet, explicit, opts, init_from, extend_vocab, given,
         max_memory=None):
    cfg, out_dir, overrides, init, stdin = _options(world, corpus, val_path, out, resume, explicit, opts, init_from,
                                                    extend_vocab, given)
    quiet = quiet or not world.root  # the other ranks print nothing but errors
    reporter = None
    if not quiet:
        from .progress import ConsoleReporter

        reporter = ConsoleReporter()
    trainer = Trainer(cfg, out_dir, resume=resume, reporter=reporter, overrides=overrides, init=init,
                      corpus_stream=sys.stdin.buffer if stdin and world.root else None, announce=not quiet,
                      world=world, max_memory=max_memory)
    try:
        try:
            result = trainer.run()
        except BaseException as e:
            if world.size > 1 and not isinstance(e, PeerStopped) and not getattr(e, "agreed", False):
                world.abort(e)  # an error of this rank alone: end every rank now (never returns)
            raise
    except PeerStopped:
        raise
    except Finished as e:
        if reporter:
            reporter.end()
        click.echo(str(e), err=True)
        return
    except (TrainError, CorpusError, CheckpointError, BackendError, ModelError, VocabError, FineTuneError,
            RankError, MemoryLimitError) as e:
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
    if not world.root:
        if result["stopped"] == "interrupted":
            sys.exit(130)
        return
    if as_json:
        click.echo(json_line(result), nl=False)
    elif not quiet and result["stopped"] != "interrupted":
        val, best = result["val_loss"], result["best_val_loss"]
        if best is not None and val is not None and best < val:
            # model.npz holds the best evaluation, not the last
            said = f", best validation loss {best:.4f} nats/token (the last evaluation {val:.4f})"
        else:
            said = f", validation loss {val:.4f} nats/token" if val is not None else ""
        click.echo(f"saved {result['model']} after {plural(result['steps'], 'step')} ({result['tokens_per_second']:,.0f} tokens/s)"
                   + said, err=True)
    if result["stopped"] == "interrupted":
        click.echo(f"interrupted: checkpoint saved to {result['checkpoint']}; continue with --resume --out {out_dir}", err=True)
        sys.exit(130)
