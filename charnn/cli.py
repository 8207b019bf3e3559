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


class Group(click.Group):
    """Turns a broken pipe on stdout into a quiet exit, as Unix tools do."""

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
              help="char: a 7-token vocabulary; word: 40 tokens.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Check with dropout on (the masks are fixed per check).")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False),
              help="With MODEL: the text sample to check on (default: random tokens).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True,
              help="Largest max relative error that passes.")
@click.option("--max-elements", type=click.IntRange(min=1), default=None,
              help="Entries checked per parameter (default all up to 300; 40 with MODEL).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
def gradcheck(model, cell, layers, hidden, embed, seq_len, batch_size, level, dropout, text_path, seed,
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
                  device=device)


def main():
    cli(prog_name="charnn")


if __name__ == "__main__":
    main()
