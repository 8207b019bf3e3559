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
from ..nn.cells import FORGET_BIAS, INPUT_SCALE
from ..nn.model import ModelError
from ..nn.optim import weight_decay_problem
from ..finetune import FineTuneError, InitFrom, merge_options
from ..train import Finished, TrainConfig, Trainer, TrainError
from ..training import policy
from ..training.folder import STDIN_NAME
from ..io.vocab import VocabError
from ..nn import cells, optim
from ..wording import plural
from .common import Finite, fail, json_line, regular_file, text_encoding
from .config import load_config
from .options import BATCH_SIZE, SEQ_LEN, ActivationChoice, CellChoice, device_options, finite, max_memory_option, rate


def default_out(corpus: str, opts: dict, sized: bool = True) -> Path:
    """models/<corpus>-<cell>-<layers>x<hidden>, or models/<corpus>-<cell> where the size is
    left to the policy (``sized`` False): the same folder whatever it chooses, so --resume finds it."""
    stem = "stdin" if corpus == "-" else Path(corpus).stem or "corpus"
    return Path("models") / (f"{stem}-{opts['cell']}" + (f"-{opts['layers']}x{opts['hidden']}" if sized else ""))


def _resumable_default(corpus: str, opts: dict) -> Path:
    """The default run folder of a --resume with no size options: the policy's, or the one
    named by the default size where only that holds a run (one started before the policy, or
    with CHARNN_POLICY=0)."""
    auto, sized = default_out(corpus, opts, sized=False), default_out(corpus, opts)
    return sized if not (auto / "last.npz").exists() and (sized / "last.npz").exists() else auto


def _cells_with(has) -> str:
    """The registered cells with a property, as a command line names them: "--cell lstm"."""
    return "--cell " + " or ".join(name for name, c in cells.CELLS.items() if has(c))


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
    """Check the options; returns (cfg, out_dir, overrides, init, stdin, policy: a
    policy.Policy where it chooses the model, else None). Every rank checks them
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
            init = InitFrom(init_from, extend_vocab, opts.get("dtype", "float32"))
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
    cell = cells.get(opts["cell"])
    if not cell.forget_gate and opts["forget_bias"] != FORGET_BIAS:
        raise click.BadParameter(f"applies to {_cells_with(lambda c: c.forget_gate)} only", param_hint="--forget-bias")
    # Only an activation asked for: a model file from before this check (a GRU saved with relu,
    # which it ignored) still fine-tunes.
    if "activation" in explicit | (given or set()) and opts["activation"] not in cell.activations:
        raise click.BadParameter(f"{opts['activation']} applies to {_cells_with(lambda c: opts['activation'] in c.activations)} "
                                 f"only", param_hint="--activation")
    if opts["embed"] and opts["input_scale"] != INPUT_SCALE:
        raise click.BadParameter("applies to one-hot input (--embed 0) only", param_hint="--input-scale")
    budget = not (opts["max_epochs"] is None and opts["max_steps"] is None and opts["time_limit"] is None)
    if not budget:
        opts["max_epochs"] = 10
    try:
        auto = policy.enabled() and init is None and not set(policy.USER_FLAGS) & (explicit | (given or set()))
    except policy.PolicyError as e:
        raise click.ClickException(str(e)) from None
    if out:
        out_dir = Path(out)
    else:
        out_dir = _resumable_default(corpus, opts) if auto and resume else default_out(corpus, opts, sized=not auto)
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
    chooser = policy.Policy() if auto and budget and not resume else None
    return cfg, out_dir, overrides, init, stdin, chooser


def _run(world, corpus, val_path, out, resume, as_json, quiet, explicit, opts, init_from, extend_vocab, given,
         max_memory=None):
    cfg, out_dir, overrides, init, stdin, chooser = _options(world, corpus, val_path, out, resume, explicit, opts, init_from,
                                                    extend_vocab, given)
    quiet = quiet or not world.root  # the other ranks print nothing but errors
    reporter = None
    if not quiet:
        from .train_progress import ConsoleReporter

        reporter = ConsoleReporter()
    trainer = Trainer(cfg, out_dir, resume=resume, reporter=reporter, overrides=overrides, init=init,
                      corpus_stream=sys.stdin.buffer if stdin and world.root else None, announce=not quiet,
                      world=world, max_memory=max_memory, policy=chooser)
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
                   + said + past_best(result, trainer.cfg.patience) + capped(result, trainer.policy_record, trainer.cfg.max_epochs), err=True)
    if result["stopped"] == "interrupted":
        click.echo(f"interrupted: checkpoint saved to {result['checkpoint']}; continue with --resume --out {out_dir}", err=True)
        sys.exit(130)


def capped(result: dict, record: dict | None, max_epochs: int | None) -> str:
    """The closing line's note on a run the policy ended at its epochs before the time limit
    (not one resumed with a --max-epochs of the user's)."""
    cap = ((record or {}).get("from") or {}).get("epoch_cap")
    if not cap or result["stopped"] != "max_epochs" or max_epochs != cap:
        return ""
    return (f"; it stopped at the {cap} epochs chosen for this corpus after {result['train_seconds']:,.0f} s of "
            f"training, of the {record['from']['time_limit']:,.0f} s allowed (more passes would overfit)")


def past_best(result: dict, patience) -> str:
    """The closing line's note on a run whose best model is older than its last steps, when no
    --patience would have stopped it: how much of the run went past the best point."""
    best, steps = result.get("best_step"), result["steps"]
    if patience or best is None or not steps or best >= steps:
        return ""
    past = steps - best
    note = f"; the best model is from step {best:,}, so the last {plural(past, 'step')} ({past / steps:.0%} of the run"
    seconds, best_seconds = result.get("train_seconds"), result.get("best_train_seconds")
    if seconds and best_seconds is not None:
        note += f", {seconds - best_seconds:,.0f} s"
    return note + ") did not improve it"


@click.command("train", epilog="""\b
Examples:
  charnn train corpora/shakespeare.txt --time-limit 900
  charnn train ptb.train.txt --level word --tokenizer whitespace --embed 200 --hidden 200
  head -c 50000 corpus.txt | charnn train - --out runs/small --max-steps 500
  charnn train --resume --out runs/small --max-steps 1000      train a run further
  charnn train new.txt --init-from models/default --extend-vocab --max-steps 300
  mpiexec -n 2 charnn train corpora/shakespeare.txt --out runs/two    (pip install 'charnn[mpi]')""")
@click.argument("corpus", required=False, type=click.Path(dir_okay=True, allow_dash=False))
@click.option("--level", type=click.Choice(["char", "word"]), default="char", show_default=True)
@click.option("--cell", type=CellChoice(), default=cells.DEFAULT_CELL, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=2, help="[2, or chosen: see above]")
@click.option("--hidden", type=click.IntRange(min=1), default=256, help="[256, or chosen: see above]")
@click.option("--embed", type=click.IntRange(min=0), default=0, show_default=True, help="Embedding size; 0 = one-hot input.")
@click.option("--dropout", type=Finite(0, 1, max_open=True), default=0.0, help="Dropout on each layer's output [0, or chosen: see above].")
@click.option("--weight-drop", type=Finite(0, 1, max_open=True), default=0.0, show_default=True,
              help="DropConnect on the recurrent weights (AWD-LSTM's weight drop): at each step each "
                   "hidden-to-hidden weight is zeroed with this chance, the same ones at every time step.")
@click.option("--state-reset", type=Finite(0, 1), default=0.01, show_default=True,
              help="Chance per stream and chunk that its carried state restarts from zero, so the model learns to start cold anywhere.")
@click.option("--forget-bias", type=float, default=cells.FORGET_BIAS, show_default=True, callback=finite,
              help="LSTM only: the forget gate's initial bias.")
@click.option("--input-scale", type=Finite(0, None), default=cells.INPUT_SCALE, show_default=True,
              help="One-hot input only (--embed 0): layer 0's input weights start U(-this, this), about the scale an embedding gives; 0 = U(-1/sqrt(H), 1/sqrt(H)), as PyTorch's nn.LSTM.")
@click.option("--activation", type=ActivationChoice(), default="tanh", show_default=True, help="Vanilla RNN only.")
@click.option("--tie/--no-tie", default=False, show_default=True, help="Tie output weights to the embedding (needs --embed = --hidden).")
@click.option("--classes", type=click.IntRange(min=-1), default=-1, show_default=True,
              help="Classes of a class-factored softmax (faster with large vocabularies); 0 = full softmax; -1 = about sqrt(V) for word vocabularies over 1,000 words.")
@click.option("--tokenizer", type=click.Choice(["regex", "whitespace"]), default="regex", show_default=True, help="Word level only.")
@click.option("--vocab-size", type=click.IntRange(min=3), default=None, help="Word level: keep the most frequent words (others become <unk>).")
@click.option("--min-count", type=click.IntRange(min=1), default=1, show_default=True, help="Word level: drop rarer words to <unk>.")
@click.option("--seq-len", type=click.IntRange(min=1), default=SEQ_LEN, show_default=True, help="Steps of backpropagation through time.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True, help="Parallel streams.")
@click.option("--optimizer", type=click.Choice(optim.OPTIMIZERS), default=optim.OPTIMIZERS[0], show_default=True)
@click.option("--lr", type=Finite(min=0, min_open=True), default=None,
              help=f"Learning rate [{', '.join(f'{name} {rate(optim.DEFAULT_LR[name])}' for name in optim.OPTIMIZERS)}].")
@click.option("--lr-decay", type=Finite(0, 1, min_open=True), default=1.0, show_default=True,
              help="Multiply the learning rate by this after each evaluation that does not improve on the best.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="cosine", show_default=True,
              help="cosine: hold --lr for the first --lr-hold of the run's limit (--max-steps, --max-epochs "
                   "or --time-limit), then lower it along a half cosine to --lr-floor, so a run ends at a "
                   "low rate; constant: keep --lr (README: the quick start with each).")
@click.option("--lr-floor", type=Finite(0, 1), default=0.05, show_default=True,
              help="The cosine schedule's last rate, as a fraction of --lr.")
@click.option("--lr-hold", type=Finite(0, 1, max_open=True), default=0.6, show_default=True,
              help="The fraction of the cosine schedule's horizon spent at the full rate before "
                   "its decay starts (warm-up, stable, decay).")
@click.option("--weight-decay", type=Finite(min=0), default=0.0, show_default=True,
              help="Adam only: decoupled weight decay (AdamW); each step multiplies the weight "
                   "matrices by 1 - lr x this (not the biases, nor an untied --embed table) [0, or chosen: see above].")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="Steps over which the rate rises linearly to --lr.")
@click.option("--clip", type=Finite(min=0), default=5.0, show_default=True, help="Global gradient-norm clip; 0 = off.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None, help="Stop after this many epochs of the whole run [10 unless --max-steps or --time-limit].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps of the whole run.")
@click.option("--time-limit", type=Finite(min=0, min_open=True), default=None, help="Stop after this many seconds (this process).")
@click.option("--val-fraction", type=Finite(0, 1, max_open=True), default=0.1, show_default=True,
              help="Hold out the last fraction of the corpus for validation.")
@click.option("--val", "val_path", type=click.Path(dir_okay=True), default=None, help="A separate validation file (instead of --val-fraction).")
@click.option("--eval-every", type=click.IntRange(min=1), default=500, show_default=True, help="Steps between evaluations and checkpoints.")
@click.option("--log-every", type=click.IntRange(min=1), default=20, show_default=True, help="Steps between progress lines and metrics.")
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True, help="Stop after this many evaluations without improvement; 0 = never.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@device_options
@click.option("--encoding", default="utf-8", show_default=True, callback=text_encoding, help="Text encoding of the corpus.")
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True,
              help="What to do with bytes the encoding cannot decode.")
@click.option("--sample-length", type=click.IntRange(min=0), default=200, show_default=True, help="Tokens sampled at each evaluation.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder [models/<corpus>-<cell>-<layers>x<hidden>; models/<corpus>-<cell> where the size is chosen].")
@click.option("--config", type=click.Path(dir_okay=False), callback=load_config, is_eager=True, expose_value=False,
              help="A TOML file of option values (its [train] table, or top level), e.g. hidden = 512; "
                   "options on the command line override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--init-from", type=click.Path(dir_okay=True), default=None,
              help="Fine-tune: start from this model file or run folder (its model.npz): its weights, vocabulary "
                   "and architecture, with a fresh optimizer.")
@click.option("--extend-vocab", is_flag=True,
              help="With --init-from: add the corpus's characters or words the model never saw (new rows "
                   "initialised as a new model's) instead of refusing them.")
@max_memory_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout at the end.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def train_command(ctx, corpus, val_path, out, resume, init_from, extend_vocab, max_memory, as_json, quiet, **opts):
    """Train a language model on CORPUS (a UTF-8 text file, or - for stdin: read once into
    the run folder as corpus-stdin.txt, which --resume then reads).

    Saves the best model by validation loss to OUT/model.npz and a full checkpoint (for
    --resume) to OUT/last.npz at every evaluation. Ctrl-C saves a checkpoint and exits 130.

    The model's size and regularisation: given a budget (--time-limit, --max-steps or
    --max-epochs) and none of --hidden, --layers, --dropout, --weight-decay, --weight-drop,
    --embed, --tie (on the command line or in --config), a new character-level run chooses
    the hidden size of a two-layer model, its dropout and its weight decay from the training
    tokens, the vocabulary, the budget and this machine's speed for each size (measured in
    about a second): the largest model that runs 4 epochs or sees 5 tokens a parameter
    within the budget and has at most 20 parameters a training token, dropout growing with
    the epochs it will run. A --time-limit alone that would buy more than 8 epochs gets
    --max-epochs 8: past them more passes over a small corpus overfit, so the run stops
    early. Its first line says what it chose and why,
    and the model file keeps it (charnn info). Any of those options, --resume or --init-from
    leave the choice to you (the defaults fill the rest), as do --level word, mpiexec and
    CHARNN_POLICY=0. Without a budget: 2x256, no dropout, 10 epochs. Where the size is left to
    the policy, the default run folder is models/<corpus>-<cell>.

    On several processes or machines: mpiexec -n K charnn train CORPUS ... trains one model,
    data-parallel, each process on --batch-size/K of the streams (needs the mpi extra:
    pip install 'charnn[mpi]'; see the README's "Training on several machines").
    """
    source = click.core.ParameterSource
    explicit = {k for k in list(opts) + ["val_path"] if ctx.get_parameter_source(k) == source.COMMANDLINE}
    given = {k for k in opts if ctx.get_parameter_source(k) in (source.COMMANDLINE, source.DEFAULT_MAP)}
    run_train(corpus=corpus, val_path=val_path, out=out, resume=resume, as_json=as_json, quiet=quiet,
              explicit=explicit, opts=opts, init_from=init_from, extend_vocab=extend_vocab, given=given,
              max_memory=max_memory)
