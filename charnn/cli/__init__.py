"""The charnn command line: a thin click layer over the library modules.

Every user-facing error is a click.ClickException (exit 1) or click.BadParameter/UsageError
(exit 2) with a one-line message; data goes to stdout, progress and notices to stderr.
"""

from __future__ import annotations

import codecs
import re
import sys

import click

from .. import __version__
from .. import dynamic as dynamic_defaults
from ..backend import DEVICES, DTYPES, BackendError, get_backend
from ..nn import cells
from ..io.fileio import file_kind
from .common import Finite, fail, text_encoding

SEQ_LEN, BATCH_SIZE = 50, 32  # train's defaults (info --plan's too)


class CellChoice(click.Choice):
    """A choice among the registered cells (nn/cells.py), read when a command line is parsed,
    so a cell registered after import is offered too; ``extra`` adds choices such as "all"."""

    def __init__(self, extra=()):
        self.extra = tuple(extra)
        super().__init__((), case_sensitive=True)

    @property
    def choices(self):
        return tuple(cells.CELLS) + self.extra

    @choices.setter
    def choices(self, value):
        pass


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
    still overrides each value. Keys are option names, with dashes or underscores. A value must
    be of the option's kind (16.5 or true is not an integer); click then checks its range."""
    if not value:
        return value
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    kind = file_kind(value)
    if kind:
        raise click.BadParameter(f"{value}: is {kind}, not a regular file")
    try:
        with open(value, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise click.BadParameter(f"{value}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{value}: not valid UTF-8 at byte {e.start} (TOML files are UTF-8)") from None
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
        param_of = next(p for p in ctx.command.params if p.name == name)
        wanted = _config_kind(param_of)
        if not _is_kind(v, wanted):
            raise click.BadParameter(f"{value}: {key} must be {wanted}, not {_toml_kind(v)} ({v!r})")
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_kind(param) -> str:
    if getattr(param, "is_flag", False):
        return "true or false"
    if isinstance(param.type, (click.types.IntParamType, click.IntRange)):
        return "an integer"
    if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
        return "a number"
    return "a string"


def _is_kind(v, wanted: str) -> bool:
    if wanted == "true or false":
        return isinstance(v, bool)
    if wanted == "an integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if wanted == "a number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, str)


def _toml_kind(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


class Group(click.Group):
    """Turns a broken pipe on stdout into a quiet exit, as Unix tools do, and Ctrl-C into one
    line and status 130 (train's own handler saves a checkpoint first)."""

    def invoke(self, ctx):
        # Caught here, inside click's main: click's own handlers would exit with status 1
        # ("Aborted!" for Ctrl-C).
        try:
            rv = super().invoke(ctx)
            sys.stdout.flush()  # a broken pipe here, not at exit (where Python reports it and exits 120)
            return rv
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:
            interrupted()

    def parse_args(self, ctx, args):
        try:  # --help and --version print here, outside invoke
            return super().parse_args(ctx, args)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:  # click's main would say "Aborted!" and exit 1
            interrupted()

    def main(self, *args, **kwargs):
        try:
            from ..dist import env_rank, env_size  # (imports NumPy: a Ctrl-C can land here too)

            _quiet_float_warnings()
            if env_size() > 1 and env_rank() > 0:
                return self._main_quiet(*args, **kwargs)
            return super().main(*args, **kwargs)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:
            interrupted()

    def _main_quiet(self, *args, **kwargs):
        """A rank other than 0 of an MPI job (mpiexec -n K charnn train): a command line click
        refuses is refused by every rank alike, and said once, by rank 0."""
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            sys.exit(1)


def _quiet_float_warnings():
    """Overflow in a diverging run is found and said by the commands themselves (training
    checks every loss and saves no non-finite weights); NumPy's RuntimeWarnings about it would
    print source lines above that one-line message. A warnings filter, not numpy.errstate:
    the engine's worker threads do not inherit an errstate. (The command line only: the API
    keeps NumPy's warnings.)"""
    import warnings

    warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                            RuntimeWarning)


def interrupted():
    """Ctrl-C outside training's loop: one line, status 130 (128 + SIGINT) as shells use."""
    try:
        click.echo("Error: interrupted", err=True)
    except Exception:
        pass
    sys.exit(130)


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
      charnn plot models/run           loss curves as a PNG or SVG
      charnn info models/run           what a model file holds
      charnn export MODEL m.safetensors  the weights under PyTorch's names
    """


@cli.command("gradcheck", epilog="""\b
Examples:
  charnn gradcheck                                  every cell, 1 and 3 layers, char and word
  charnn gradcheck --cell gru --layers 2 --dropout 0.3
  charnn gradcheck models/default --text corpora/shakespeare.txt""")
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--cell", type=CellChoice(extra=("all",)), default="all", show_default=True)
@click.option("--layers", callback=int_list, default="1,3", show_default=True, help="Layer counts to check (comma-separated).")
@click.option("--hidden", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--embed", callback=int_list, default="0,4", show_default=True, help="Embedding sizes to check; 0 = one-hot input.")
@click.option("--seq-len", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--level", type=click.Choice(["char", "word", "both"]), default="both", show_default=True,
              help="char: a 7-token vocabulary, full softmax; word: 40 tokens, class-factored softmax.")
@click.option("--dropout", type=Finite(0, 1, max_open=True), default=0.0, show_default=True,
              help="Check with dropout on (the masks are fixed per check).")
@click.option("--classes", type=click.IntRange(min=0), default=6, show_default=True,
              help="Word level: classes of the class-factored softmax; 0 = full softmax.")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False),
              help="With MODEL: the text sample to check on (default: random tokens).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--tolerance", type=Finite(min=0, min_open=True), default=1e-6, show_default=True,
              help="Largest max relative error that passes.")
@click.option("--max-elements", type=click.IntRange(min=1), default=None,
              help="Entries checked per parameter (default all up to 300; 40 with MODEL).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def gradcheck_command(model, cell, layers, hidden, embed, seq_len, batch_size, level, dropout, classes, text_path, seed,
              tolerance, max_elements, device, quiet):
    """Compare the analytic gradients with numerical ones (float64, central differences).

    Without MODEL, builds small models for every combination of the options; with MODEL
    (a model file or run folder), checks that architecture with its trained weights.
    Exits 0 when every parameter passes, 1 naming the ones that fail.
    """
    from .gradcheck import run_gradcheck

    run_gradcheck(model=model, cells=tuple(cells.CELLS) if cell == "all" else (cell,), layers=layers,
                  hidden=hidden, embeds=embed, seq_len=seq_len, batch_size=batch_size,
                  levels=("char", "word") if level == "both" else (level,), dropout=dropout,
                  text_path=text_path, seed=seed, tolerance=tolerance, max_elements=max_elements,
                  device=device, classes=classes, quiet=quiet)



@cli.command("train", epilog="""\b
Examples:
  charnn train corpora/shakespeare.txt --time-limit 900
  charnn train ptb.train.txt --level word --tokenizer whitespace --embed 200 --hidden 200
  head -c 50000 corpus.txt | charnn train - --out runs/small --max-steps 500
  charnn train --resume --out runs/small --max-steps 1000      train a run further
  charnn train new.txt --init-from models/default --extend-vocab --max-steps 300
  mpiexec -n 2 charnn train corpora/shakespeare.txt --out runs/two    (pip install 'charnn[mpi]')""")
@click.argument("corpus", required=False, type=click.Path(dir_okay=True, allow_dash=False))
@click.option("--level", type=click.Choice(["char", "word"]), default="char", show_default=True)
@click.option("--cell", type=CellChoice(), default="lstm", show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--embed", type=click.IntRange(min=0), default=0, show_default=True, help="Embedding size; 0 = one-hot input.")
@click.option("--dropout", type=Finite(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--weight-drop", type=Finite(0, 1, max_open=True), default=0.0, show_default=True,
              help="DropConnect on the recurrent weights (AWD-LSTM's weight drop): at each step each "
                   "hidden-to-hidden weight is zeroed with this chance, the same ones at every time step.")
@click.option("--state-reset", type=Finite(0, 1), default=0.01, show_default=True,
              help="Chance per stream and chunk that its carried state restarts from zero, so the model learns to start cold anywhere.")
@click.option("--forget-bias", type=float, default=cells.FORGET_BIAS, show_default=True, callback=finite,
              help="LSTM only: the forget gate's initial bias.")
@click.option("--input-scale", type=Finite(0, None), default=cells.INPUT_SCALE, show_default=True,
              help="One-hot input only (--embed 0): layer 0's input weights start U(-this, this), about the scale an embedding gives; 0 = U(-1/sqrt(H), 1/sqrt(H)), as PyTorch's nn.LSTM.")
@click.option("--activation", type=click.Choice(["tanh", "relu"]), default="tanh", show_default=True, help="Vanilla RNN only.")
@click.option("--tie/--no-tie", default=False, show_default=True, help="Tie output weights to the embedding (needs --embed = --hidden).")
@click.option("--classes", type=click.IntRange(min=-1), default=-1, show_default=True,
              help="Classes of a class-factored softmax (faster with large vocabularies); 0 = full softmax; -1 = about sqrt(V) for word vocabularies over 1,000 words.")
@click.option("--tokenizer", type=click.Choice(["regex", "whitespace"]), default="regex", show_default=True, help="Word level only.")
@click.option("--vocab-size", type=click.IntRange(min=3), default=None, help="Word level: keep the most frequent words (others become <unk>).")
@click.option("--min-count", type=click.IntRange(min=1), default=1, show_default=True, help="Word level: drop rarer words to <unk>.")
@click.option("--seq-len", type=click.IntRange(min=1), default=SEQ_LEN, show_default=True, help="Steps of backpropagation through time.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True, help="Parallel streams.")
@click.option("--optimizer", type=click.Choice(["adam", "adagrad", "rmsprop", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=Finite(min=0, min_open=True), default=None, help="Learning rate [adam 3e-3, rmsprop 2e-3, adagrad 0.1, sgd 1].")
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
                   "matrices by 1 - lr x this (not the biases, nor an untied --embed table).")
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
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder [models/<corpus>-<cell>-<layers>x<hidden>].")
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout at the end.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def train_command(ctx, corpus, val_path, out, resume, init_from, extend_vocab, as_json, quiet, **opts):
    """Train a language model on CORPUS (a UTF-8 text file, or - for stdin: read once into
    the run folder as corpus-stdin.txt, which --resume then reads).

    Saves the best model by validation loss to OUT/model.npz and a full checkpoint (for
    --resume) to OUT/last.npz at every evaluation. Ctrl-C saves a checkpoint and exits 130.

    On several processes or machines: mpiexec -n K charnn train CORPUS ... trains one model,
    data-parallel, each process on --batch-size/K of the streams (needs the mpi extra:
    pip install 'charnn[mpi]'; see the README's "Training on several machines").
    """
    from .train import run_train

    source = click.core.ParameterSource
    explicit = {k for k in list(opts) + ["val_path"] if ctx.get_parameter_source(k) == source.COMMANDLINE}
    given = {k for k in opts if ctx.get_parameter_source(k) in (source.COMMANDLINE, source.DEFAULT_MAP)}
    run_train(corpus=corpus, val_path=val_path, out=out, resume=resume, as_json=as_json, quiet=quiet,
              explicit=explicit, opts=opts, init_from=init_from, extend_vocab=extend_vocab, given=given)



# Python's string escapes; any other backslash stays as typed ("\d" is a backslash and a d).
ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]*\}|[0-7]{1,3}|[\\'\"abfnrtv]|[xuUN]|$)")


def unescape(ctx, param, value):
    """Let "\\n" and "\\t" typed on a command line mean a newline and a tab (Python's escapes,
    decoded one by one so other characters stay as typed); a malformed escape ("\\" at the end,
    "\\x4") is a usage error, as is text that is not valid Unicode (a lone surrogate)."""
    if value is None:
        return None

    def one(m):
        seq = m.group(0)
        if seq in ("\\", "\\x", "\\u", "\\U", "\\N"):
            raise click.BadParameter(f"{value!r}: malformed escape {seq!r} (write \\\\ for a backslash)")
        try:
            return codecs.decode(seq, "unicode_escape")
        except UnicodeDecodeError as e:
            raise click.BadParameter(f"{value!r}: malformed escape {seq!r} ({e.reason})") from None

    out = ESCAPE.sub(one, value) if "\\" in value else value
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter(f"{value!r} is not valid text (a lone surrogate or undecodable bytes)") from None
    return out


@cli.command("sample", epilog="""\b
Examples:
  charnn sample --prime "ROMEO:" --temperature 0.8 --length 300 --seed 1
  charnn sample runs/small --top-p 0.9 --num-samples 3 --stop-at "\\n\\n"
  charnn sample --beam-size 5 --length 80 --prime "ROMEO:"    the most likely text""")
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--length", "-n", type=click.IntRange(min=0), default=500, show_default=True, help="Tokens to generate (characters or words).")
@click.option("--temperature", "-t", type=Finite(min=0), default=1.0, show_default=True, help="0 = greedy (always the most likely token).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample among the k most likely tokens only.")
@click.option("--top-p", type=Finite(0, 1, min_open=True), default=None, help="Sample from the smallest set of tokens holding probability p.")
@click.option("--prime", default="", help="Text to warm the state on; generation continues it.", callback=unescape)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Same seed, same text [random].")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--stop-at", default=None, callback=unescape, help='Stop a sample when it ends with this text, e.g. "\\n" or ".".')
@click.option("--beam-size", type=click.IntRange(min=1), default=None, help="Beam search for the most likely continuation instead of sampling.")
@click.option("--no-repeat-ngram", type=click.IntRange(min=0), default=None,
              help="--beam-size: no n-gram of this many tokens twice in the text [8 characters, 3 words; 0 = off].")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample on stdout.")
@click.pass_context
def sample_command(ctx, model, length, temperature, top_k, top_p, prime, seed, num_samples, stop_at, beam_size,
                   no_repeat_ngram, device, as_json):
    """Generate text from MODEL (a model file or run folder; default: the bundled
    Shakespeare model). Tokens stream to stdout as they are generated."""
    from .sample import run_sample

    source = click.core.ParameterSource
    given = {p.name for p in ctx.command.params
             if ctx.get_parameter_source(p.name) in (source.COMMANDLINE, source.ENVIRONMENT)}
    if beam_size is not None:
        # Beam search is deterministic: sampling's options would be silently ignored.
        clash = [f"--{n.replace('_', '-')}" for n in ("temperature", "top_k", "top_p", "seed") if n in given]
        if num_samples > 1:
            clash.append(f"--num-samples {num_samples} (beam search gives one text)")
        if clash:
            raise click.UsageError(f"--beam-size searches for the most likely text and does not sample: "
                                   f"it cannot be used with {', '.join(clash)}")
    elif no_repeat_ngram is not None:
        raise click.UsageError("--no-repeat-ngram applies to --beam-size only")
    run_sample(model, length, temperature, top_k, top_p, prime, seed, num_samples, stop_at, beam_size, device, as_json,
               no_repeat=no_repeat_ngram)


def _per_level(name: str) -> str:
    """A dynamic-evaluation default per level, for help texts: "char 20, word 10"."""
    return ", ".join(f"{level} {getattr(d, name):g}" for level, d in dynamic_defaults.DEFAULTS.items())


@cli.command("score", epilog="""\b
Examples:
  echo "To be, or not to be, that is the question." | charnn score -
  charnn score runs/small sentences.txt --format jsonl
  charnn score val.txt --document --streams 8       held-out loss of a whole text
  charnn score runs/small test.txt --document --dynamic --dynamic-tune heldout.txt""")
@click.argument("args", nargs=-1, type=click.Path(allow_dash=True))
@click.option("--document", is_flag=True, help="Score the whole input as one text with carried state.")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl"]), default="table", show_default=True)
@click.option("--tokens", "show_tokens", is_flag=True, help="Show each token coloured by its surprisal.")
@click.option("--strict", is_flag=True, help="Unknown characters are an error instead of being left out.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Lines scored together.")
@click.option("--streams", type=click.IntRange(min=1), default=1, show_default=True,
              help="--document: score this many pieces side by side (faster, slightly less context).")
@click.option("--dynamic", is_flag=True,
              help="--document: dynamic evaluation: adapt a copy of the weights to the text as it is read, "
                   "one gradient step per segment after scoring it (the model file is not changed).")
@click.option("--dynamic-lr", type=Finite(min=0), default=None,
              help="--dynamic: the learning rate eta of the RMS-normalised step "
                   f"[{_per_level('lr')}; 0 = static scoring].")
@click.option("--dynamic-decay", type=Finite(0, 1), default=None,
              help=f"--dynamic: the decay lambda towards the trained weights [{_per_level('decay')}].")
@click.option("--dynamic-segment", type=click.IntRange(min=1), default=None,
              help=f"--dynamic: tokens per segment, one update after each [{_per_level('segment')}].")
@click.option("--dynamic-stats", type=click.Path(dir_okay=False), default=None,
              help=f"--dynamic: training-side text to measure the mean squared gradients on (its last "
                   f"{dynamic_defaults.STATS_TOKENS:,} tokens) [the model's training corpus, its training part, "
                   "if present and unchanged].")
@click.option("--dynamic-tune", type=click.Path(dir_okay=False), default=None,
              help="--dynamic: choose the learning rate and decay not given by a grid search on this "
                   "held-out training-side text (never the scored text; keep it small: a pass over it for "
                   "each grid point, "
                   f"{len(dynamic_defaults.LR_GRID) * len(dynamic_defaults.DECAY_GRID)} in all).")
@click.option("--encoding", default="utf-8", show_default=True, callback=text_encoding)
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def score_command(args, document, fmt, show_tokens, strict, batch_size, streams, dynamic, dynamic_lr, dynamic_decay,
                  dynamic_segment, dynamic_stats, dynamic_tune, encoding, errors, device, quiet):
    """Score text: [MODEL] [FILE|-]. Each line of FILE (or stdin) is a sentence; prints its
    log-probability, tokens, nats and bits per token and perplexity, then a summary.
    MODEL defaults to the bundled Shakespeare model."""
    from .score import DynamicOptions, run_score

    if len(args) > 2:
        raise click.UsageError("expected at most MODEL and FILE")
    dyn = DynamicOptions(dynamic_lr, dynamic_decay, dynamic_segment, dynamic_stats, dynamic_tune)
    if dynamic:
        if not document:
            raise click.UsageError("--dynamic adapts the model along one text: it needs --document")
        if streams > 1:
            raise click.UsageError("--dynamic reads the text as one stream: it cannot be used with --streams")
        if dynamic_tune is not None and dynamic_lr is not None and dynamic_decay is not None:
            raise click.UsageError("--dynamic-tune has nothing to choose: --dynamic-lr and --dynamic-decay are both given")
    elif dyn.given():
        raise click.UsageError(f"{dyn.given()[0]} applies to --dynamic only")
    run_score(args, document, fmt, show_tokens, strict, batch_size, streams, encoding, errors, device, quiet=quiet,
              dynamic=dyn if dynamic else None)


@cli.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", default="loss.png", show_default=True, type=click.Path(dir_okay=False),
              help="The image file: .png or .svg.")
@click.option("--x", "x", type=click.Choice(["steps", "tokens", "seconds"]), default="steps", show_default=True,
              help="The horizontal axis: training steps, tokens seen, or elapsed seconds (resumes included).")
@click.option("--title", default=None, help="The plot's title [charnn training].")
def plot_command(runs, out, x, title):
    """Plot training and validation loss of RUN [RUN...] (run folders or their metrics.jsonl),
    overlaid, the best validation point of each starred. Needs matplotlib: pip install 'charnn[plot]'.

    \b
      charnn plot models/default                       loss.png
      charnn plot runs/a runs/b --x seconds -o ab.svg  two runs against time
    """
    from .plot import run_plot

    run_plot(runs, out, x, title)


@cli.command("info")
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (null where a field is unknown).")
@click.option("--plan", "show_plan", is_flag=True,
              help="Show the CPU engine's path for MODEL's training steps and scoring passes, and why.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True,
              help="With --plan: the streams of the work.")
@click.option("--seq-len", type=click.IntRange(min=1), default=SEQ_LEN, show_default=True,
              help="With --plan: the time steps of the work.")
@click.option("--measure", is_flag=True, help="With --plan: measure the candidate paths now (again) and keep the fastest.")
def info_command(model, as_json, show_plan, batch_size, seq_len, measure):
    """Show what MODEL holds (a model file, run folder or .safetensors; default: the bundled
    Shakespeare model): architecture, parameter count, file size, vocabulary, the training
    corpus's digest, steps, tokens, validation loss and when it was saved. With --plan: the
    path the CPU engine runs MODEL's work on (the planner's choice, its timings, or the
    rules' and why).

    \b
      charnn info                      the bundled model
      charnn info models/run --json    for programs
      charnn info --plan --batch-size 64 --seq-len 100 --measure
    """
    ctx = click.get_current_context()
    if not show_plan:
        given = [f"--{name.replace('_', '-')}" for name in ("batch_size", "seq_len", "measure")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)}: needs --plan")
        from .info import run_info

        run_info(model, as_json)
        return
    from .info import run_plan

    run_plan(model, batch_size, seq_len, measure, as_json)


@cli.command("export")
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("out", type=click.Path(dir_okay=False))
def export_command(model, out):
    """Write MODEL (a model file or run folder) to OUT as a safetensors file under PyTorch's names
    (embedding.weight, rnn.weight_ih_l0, ..., decoder.weight), for nn.Embedding, nn.RNN/LSTM/GRU
    and nn.Linear; the vocabulary and configuration go in its metadata. charnn sample and
    score read such files too.

    \b
      charnn export models/default shakespeare.safetensors
      charnn sample shakespeare.safetensors -n 100
    """
    from .export import run_export

    run_export(model, out)


def main():
    """The entry point without charnn/__main__.py's guard around the imports above."""
    cli(prog_name="charnn")


if __name__ == "__main__":
    main()
