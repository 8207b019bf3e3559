"""The charnn command line: a thin click layer over the library modules.

Every user-facing error is a click.ClickException (exit 1) or click.BadParameter/UsageError
(exit 2) with a one-line message; data goes to stdout, progress and notices to stderr.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .backend import DEVICES, DTYPES, BackendError, get_backend

CELL_CHOICES = ("rnn", "lstm", "gru")


def fail(message: str):
    raise click.ClickException(message)


def device_options(f):
    f = click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                     help="Float type of parameters and activations.")(f)
    f = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="auto: the GPU when CuPy sees one, else the CPU.")(f)
    return f


def backend_or_fail(device: str, dtype: str, announce: bool = True):
    try:
        return get_backend(device, dtype, announce=announce)
    except BackendError as e:
        fail(str(e))


def int_list(ctx, param, value):
    """Parse "1,3" into [1, 3]."""
    if value is None:
        return None
    try:
        out = [int(v) for v in str(value).split(",") if v.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out:
        raise click.BadParameter("expected at least one value")
    return out


def finite(ctx, param, value):
    """Refuse nan and inf, which float() accepts."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def load_config(ctx, param, value):
    """Read a TOML file into the command's defaults (click's default_map), so the command line
    still overrides each value. Keys are option names, with dashes or underscores."""
    if not value:
        return value
    import tomllib

    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise click.BadParameter(f"{value}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{value}: not valid TOML: {e}") from None
    table = data.get(ctx.info_name, data)
    if not isinstance(table, dict):
        raise click.BadParameter(f"{value}: [{ctx.info_name}] must be a table")
    names = {}
    for p in ctx.command.params:
        for opt in p.opts:
            names[opt.lstrip("-").replace("-", "_")] = p.name
        names[p.name] = p.name
    defaults = {}
    for key, v in table.items():
        name = names.get(str(key).replace("-", "_"))
        if name is None or name in ("config", "resume"):
            raise click.BadParameter(f"{value}: unknown option {key!r}")
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


class Group(click.Group):
    """Turns a broken pipe on stdout into a quiet exit, as Unix tools do."""

    def invoke(self, ctx):
        # Caught here, inside click's main: click's own handler would exit with status 1.
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        except BrokenPipeError:
            _quiet_broken_pipe()


def _quiet_broken_pipe():
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charnn")
def cli():
    """Recurrent neural network language models (RNN, LSTM, GRU) on text, written from
    scratch in NumPy (CuPy on a GPU).

    \b
      charnn train corpus.txt          train a model (saved under models/)
      charnn sample --temperature 0.8  generate text
      charnn score sentences.txt       log-probability and perplexity of each line
      charnn gradcheck                 check the hand-written gradients
    """


@cli.command()
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--cell", type=click.Choice(CELL_CHOICES + ("all",)), default="all", show_default=True)
@click.option("--layers", callback=int_list, default="1,3", show_default=True, help="Layer counts to check (comma-separated).")
@click.option("--hidden", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--embed", callback=int_list, default="0,4", show_default=True, help="Embedding sizes to check; 0 = one-hot input.")
@click.option("--seq-len", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--level", type=click.Choice(["char", "word", "both"]), default="both", show_default=True,
              help="char: a 7-token vocabulary, full softmax; word: 40 tokens, class-factored softmax.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Check with dropout on (the masks are fixed per check).")
@click.option("--classes", type=click.IntRange(min=0), default=6, show_default=True,
              help="Word level: classes of the class-factored softmax; 0 = full softmax.")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False),
              help="With MODEL: the text sample to check on (default: random tokens).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True,
              help="Largest max relative error that passes.")
@click.option("--max-elements", type=click.IntRange(min=1), default=None,
              help="Entries checked per parameter (default all up to 300; 40 with MODEL).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
def gradcheck(model, cell, layers, hidden, embed, seq_len, batch_size, level, dropout, classes, text_path, seed,
              tolerance, max_elements, device):
    """Compare the analytic gradients with numerical ones (float64, central differences).

    Without MODEL, builds small models for every combination of the options; with MODEL
    (a model file or run folder), checks that architecture with its trained weights.
    Exits 0 when every parameter passes, 1 naming the ones that fail.
    """
    from .gradcheck_cli import run_gradcheck

    run_gradcheck(model=model, cells=CELL_CHOICES if cell == "all" else (cell,), layers=layers,
                  hidden=hidden, embeds=embed, seq_len=seq_len, batch_size=batch_size,
                  levels=("char", "word") if level == "both" else (level,), dropout=dropout,
                  text_path=text_path, seed=seed, tolerance=tolerance, max_elements=max_elements,
                  device=device, classes=classes)



@cli.command()
@click.argument("corpus", required=False, type=click.Path(dir_okay=True, allow_dash=False))
@click.option("--level", type=click.Choice(["char", "word"]), default="char", show_default=True)
@click.option("--cell", type=click.Choice(CELL_CHOICES), default="lstm", show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--embed", type=click.IntRange(min=0), default=0, show_default=True, help="Embedding size; 0 = one-hot input.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--state-reset", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Chance per stream and chunk that its carried state restarts from zero, so the model learns to start cold anywhere.")
@click.option("--forget-bias", type=float, default=1.0, show_default=True, callback=finite,
              help="LSTM only: the forget gate's initial bias.")
@click.option("--activation", type=click.Choice(["tanh", "relu"]), default="tanh", show_default=True, help="Vanilla RNN only.")
@click.option("--tie/--no-tie", default=False, show_default=True, help="Tie output weights to the embedding (needs --embed = --hidden).")
@click.option("--classes", type=int, default=-1, show_default=True,
              help="Classes of a class-factored softmax (faster with large vocabularies); 0 = full softmax; -1 = about sqrt(V) for word vocabularies over 1,000 words.")
@click.option("--tokenizer", type=click.Choice(["regex", "whitespace"]), default="regex", show_default=True, help="Word level only.")
@click.option("--vocab-size", type=click.IntRange(min=3), default=None, help="Word level: keep the most frequent words (others become <unk>).")
@click.option("--min-count", type=click.IntRange(min=1), default=1, show_default=True, help="Word level: drop rarer words to <unk>.")
@click.option("--seq-len", type=click.IntRange(min=1), default=50, show_default=True, help="Steps of backpropagation through time.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Parallel streams.")
@click.option("--optimizer", type=click.Choice(["adam", "adagrad", "rmsprop", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Learning rate [adam 3e-3, rmsprop 2e-3, adagrad 0.1, sgd 1].")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Multiply the learning rate by this after each evaluation that does not improve on the best.")
@click.option("--clip", type=click.FloatRange(min=0), default=5.0, show_default=True, help="Global gradient-norm clip; 0 = off.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None, help="Stop after this many epochs of the whole run [10 unless --max-steps or --time-limit].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps of the whole run.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after this many seconds (this process).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Hold out the last fraction of the corpus for validation.")
@click.option("--val", "val_path", type=click.Path(dir_okay=True), default=None, help="A separate validation file (instead of --val-fraction).")
@click.option("--eval-every", type=click.IntRange(min=1), default=500, show_default=True, help="Steps between evaluations and checkpoints.")
@click.option("--log-every", type=click.IntRange(min=1), default=20, show_default=True, help="Steps between progress lines and metrics.")
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True, help="Stop after this many evaluations without improvement; 0 = never.")
@click.option("--seed", type=int, default=0, show_default=True)
@device_options
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of the corpus.")
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True,
              help="What to do with bytes the encoding cannot decode.")
@click.option("--sample-length", type=click.IntRange(min=0), default=200, show_default=True, help="Tokens sampled at each evaluation.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder [models/<corpus>-<cell>-<layers>x<hidden>].")
@click.option("--config", type=click.Path(dir_okay=False), callback=load_config, is_eager=True, expose_value=False,
              help="A TOML file of option values (its [train] table, or top level), e.g. hidden = 512; "
                   "options on the command line override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout at the end.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def train(ctx, corpus, val_path, out, resume, as_json, quiet, **opts):
    """Train a language model on CORPUS (a UTF-8 text file).

    Saves the best model by validation loss to OUT/model.npz and a full checkpoint (for
    --resume) to OUT/last.npz at every evaluation. Ctrl-C saves a checkpoint and exits 130.
    """
    from .train_cli import run_train

    explicit = {k for k in list(opts) + ["val_path"] if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    run_train(corpus=corpus, val_path=val_path, out=out, resume=resume, as_json=as_json, quiet=quiet,
              explicit=explicit, opts=opts)



def unescape(ctx, param, value):
    """Let "\n" and "\t" typed on a command line mean a newline and a tab."""
    if value is None:
        return None
    return value.encode("utf-8").decode("unicode_escape") if "\\" in value else value


@cli.command()
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--length", "-n", type=click.IntRange(min=0), default=500, show_default=True, help="Tokens to generate (characters or words).")
@click.option("--temperature", "-t", type=click.FloatRange(min=0), default=1.0, show_default=True, help="0 = greedy (always the most likely token).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample among the k most likely tokens only.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Sample from the smallest set of tokens holding probability p.")
@click.option("--prime", default="", help="Text to warm the state on; generation continues it.", callback=unescape)
@click.option("--seed", type=int, default=None, help="Same seed, same text [random].")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--stop-at", default=None, callback=unescape, help='Stop a sample when it ends with this text, e.g. "\\n" or ".".')
@click.option("--beam-size", type=click.IntRange(min=1), default=None, help="Beam search for the most likely continuation instead of sampling.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample on stdout.")
def sample(model, length, temperature, top_k, top_p, prime, seed, num_samples, stop_at, beam_size, device, as_json):
    """Generate text from MODEL (a model file or run folder; default: the bundled
    Shakespeare model). Tokens stream to stdout as they are generated."""
    from .sample_cli import run_sample

    run_sample(model, length, temperature, top_k, top_p, prime, seed, num_samples, stop_at, beam_size, device, as_json)


@cli.command()
@click.argument("args", nargs=-1, type=click.Path(allow_dash=True))
@click.option("--document", is_flag=True, help="Score the whole input as one text with carried state.")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl"]), default="table", show_default=True)
@click.option("--tokens", "show_tokens", is_flag=True, help="Show each token coloured by its surprisal.")
@click.option("--strict", is_flag=True, help="Unknown characters are an error instead of being left out.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Lines scored together.")
@click.option("--streams", type=click.IntRange(min=1), default=1, show_default=True,
              help="--document: score this many pieces side by side (faster, slightly less context).")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def score(args, document, fmt, show_tokens, strict, batch_size, streams, encoding, errors, device):
    """Score text: [MODEL] [FILE|-]. Each line of FILE (or stdin) is a sentence; prints its
    log-probability, tokens, nats and bits per token and perplexity, then a summary.
    MODEL defaults to the bundled Shakespeare model."""
    from .score_cli import run_score

    if len(args) > 2:
        raise click.UsageError("expected at most MODEL and FILE")
    run_score(args, document, fmt, show_tokens, strict, batch_size, streams, encoding, errors, device)


def main():
    cli(prog_name="charnn")


if __name__ == "__main__":
    main()
