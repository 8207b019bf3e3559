"""`charnn score`: reports how likely a model finds each line (or a whole document)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import dynamic as dyn
from .. import dynamic_run
from ..backend import DEVICES
from ..io.checkpoint import looks_like_model
from ..io.data import CorpusError, read_text
from ..io.fileio import file_kind
from ..io.vocab import iter_lines
from ..memory import MemoryLimitError
from ..score import (ScoreError, score_document, score_lines, score_row, summarize, surprisal_pairs,
                     unknown_report)
from ..wording import plural
from .common import Finite, StdoutConsole, json_line, text_encoding
from .options import max_memory_option
from .progress import WorkProgress
from .sample import load_for_use

# Surprisal (bits) -> background colour, from "expected" to "very surprised".
HEAT = [(1, None), (2, "#3a3a00"), (4, "#5f5f00"), (6, "#875f00"), (8, "#af5f00"), (11, "#d75f00"), (float("inf"), "#ff0000")]


def _looks_like_model(arg: str) -> bool:
    """A folder, or a regular file that starts as a model file does (a zip or safetensors). Anything else (a pipe from
    ``<(...)``, a FIFO, /dev/stdin) is never opened here: reading it would consume the text."""
    p = Path(arg)
    if p.is_dir():
        return True
    if file_kind(p) or not p.is_file():
        return False
    return looks_like_model(p)


def heat_text(tokens, surprisal, level: str) -> Text:
    """The tokens on backgrounds by surprisal (bits); one that is not a finite number (a model
    with overflowing weights) is shown as the most surprising."""
    out = Text()
    for i, (tok, bits) in enumerate(zip(tokens, surprisal)):
        shown = {"\n": "⏎", "<eos>": "⏎"}.get(tok, tok)
        if level == "word" and i:
            out.append(" ")
        style = next((colour for limit, colour in HEAT if bits < limit), HEAT[-1][1])
        out.append(shown, style=f"on {style}" if style else "")
    return out


def _run_dynamic(lm, vocab, meta, path, text, settings, strict, show_tokens, encoding, errors, progress, err: Console,
                 max_memory=None):
    """score --document --dynamic (dynamic_run): says on ``err`` (one line) what it uses before
    it scores. Returns (Scored, what was used, for the summary)."""
    try:
        plan = dynamic_run.prepare(lm, vocab, text, settings, meta, path, encoding, errors, progress, max_memory)
        err.print(f"charnn score: {plan.describe()}", highlight=False, markup=False, soft_wrap=True)
        scored = plan.score(lm, vocab, text, strict, show_tokens, progress, max_memory)
    except (dyn.DynamicError, CorpusError) as e:
        raise click.ClickException(str(e)) from None
    return scored, plan.to_json()


def run_score(args, document, fmt, show_tokens, strict, batch_size, streams, encoding, errors, device, quiet=False,
              dynamic: dyn.DynamicSettings | None = None, max_memory=None):
    model_arg, file_arg = None, "-"
    if len(args) == 2:
        model_arg, file_arg = args
    elif len(args) == 1:
        if args[0] != "-" and _looks_like_model(args[0]):
            model_arg = args[0]
        else:
            file_arg = args[0]
    lm, vocab, path, ckpt = load_for_use(model_arg, device, quiet, with_checkpoint=True)
    if file_arg == "-" and sys.stdin.isatty():
        # Otherwise it would wait for text with nothing on the screen to say so.
        click.echo("charnn score: reading sentences from the terminal, one a line; end with Ctrl-D "
                   "(or pass a FILE, or pipe text in)", err=True)
    try:
        text = read_text(file_arg, encoding, errors, pipes=True)
    except CorpusError as e:
        raise click.ClickException(str(e)) from None
    err = Console(stderr=True)
    lines = iter_lines(text)
    unknown = unknown_report(vocab, lines)
    if unknown:
        shown = ", ".join(f"{c!r} (line {n}, column {col})" for n, col, c in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        if strict:
            raise click.ClickException(f"{plural(len(unknown), 'character')} {'is' if len(unknown) == 1 else 'are'} not in the model's vocabulary: {shown}{more}")
        err.print(f"note: {plural(len(unknown), 'character')} not in the model's vocabulary {'was' if len(unknown) == 1 else 'were'} left out of the score: {shown}{more}",
                  highlight=False, markup=False, soft_wrap=True)
    unit = "lines" if not document else ("characters" if vocab.level == "char" else "words")
    try:
        with WorkProgress("scoring", unit, quiet=quiet, console=err) as progress:
            if dynamic is not None:
                scored, used = _run_dynamic(lm, vocab, ckpt.meta, path, text, dynamic, strict, show_tokens, encoding,
                                            errors, progress, err, max_memory)
                items = [scored]
            elif document:
                items = [score_document(lm, vocab, text, streams=streams, strict=strict, with_tokens=show_tokens,
                                        progress=progress, max_memory=max_memory)]
            else:
                items = score_lines(lm, vocab, lines, batch_size=batch_size, strict=strict, with_tokens=show_tokens,
                                    progress=progress, max_memory=max_memory)
    except (ScoreError, MemoryLimitError) as e:
        raise click.ClickException(str(e)) from None
    summary = summarize(items)
    if document:
        summary["lines"] = len(lines)
    if dynamic is not None:
        summary["dynamic"] = used
    if fmt == "jsonl":
        for n, s in enumerate(items if not document else [], 1):
            sys.stdout.write(json_line(score_row(s, n, show_tokens)))
        if document and show_tokens:
            summary["token_surprisal_bits"] = surprisal_pairs(items[0])
        sys.stdout.write(json_line(summary))
        return
    out = StdoutConsole(highlight=False)
    if show_tokens:
        for s in items:
            out.print(heat_text(s.token_strings, s.surprisal, vocab.level))
            if not document:
                out.print(f"  {plural(s.tokens, 'token')}, {s.logprob:.2f} nats, {s.bits_per_token:.3f} bits/token", style="dim")
        out.print("surprisal colours: none < 1 bit, then 2, 4, 6, 8, 11 bits, red above", style="dim")
    if not document:
        # Text objects, not str: rich would read "[...]" in a line or a path as markup.
        table = Table(caption=Text(f"model: {path}; logprob in nats (natural log)"), caption_justify="left")
        for col in ("#", "tokens", "logprob", "nats/tok", "bits/tok", "ppl", "text"):
            if col == "text":
                table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=max(10, out.width - 62))
            else:
                table.add_column(col, justify="right", no_wrap=True, min_width=max(len(col), 3 if col == "#" else 7))
        for n, s in enumerate(items, 1):
            table.add_row(str(n), str(s.tokens), f"{s.logprob:.2f}", f"{s.nats_per_token:.3f}",
                          f"{s.bits_per_token:.3f}", f"{s.perplexity:.2f}", Text(s.text))
        table.add_section()
        table.add_row("all", str(summary["tokens"]), f"{summary['logprob']:.2f}", f"{summary['nats_per_token']:.3f}",
                      f"{summary['bits_per_token']:.3f}", f"{summary['perplexity']:.2f}", plural(summary["lines"], "line"))
        out.print(table)
    else:
        out.print(f"tokens {summary['tokens']}  nats/token {summary['nats_per_token']:.4f}  "
                  f"bits/token {summary['bits_per_token']:.4f}  perplexity {summary['perplexity']:.3f}")
    if summary["excluded"]:
        out.print(f"{plural(summary['excluded'], 'unknown character')} left out", style="dim")


def _per_level(name: str) -> str:
    """A dynamic-evaluation default per level, for help texts: "char 20, word 10"."""
    return ", ".join(f"{level} {getattr(d, name):g}" for level, d in dyn.DEFAULTS.items())


@click.command("score", epilog="""\b
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
              help="--dynamic: the learning rate eta of the RMS-normalised step [tuned with the decay on the "
                   f"model's validation text, else {_per_level('lr')}; 0 = static scoring].")
@click.option("--dynamic-decay", type=Finite(0, 1), default=None,
              help="--dynamic: the decay lambda towards the trained weights [tuned with the rate, else "
                   f"{_per_level('decay')}].")
@click.option("--dynamic-segment", type=click.IntRange(min=1), default=None,
              help=f"--dynamic: tokens per segment, one update after each [{_per_level('segment')}].")
@click.option("--dynamic-stats", type=click.Path(dir_okay=False), default=None,
              help=f"--dynamic: training-side text to measure the mean squared gradients on (its last "
                   f"{dyn.STATS_TOKENS:,} tokens) [the model's training corpus, its training part, "
                   "if present and unchanged].")
@click.option("--dynamic-tune", type=click.Path(dir_okay=False), default=None,
              help="--dynamic: choose the learning rate and decay not given by a grid search on this "
                   "held-out training-side text (never the scored text; keep it small: a pass over it for "
                   f"each grid point, {len(dyn.LR_GRID) * len(dyn.DECAY_GRID)} and more past an edge) [the model's "
                   "validation text (the validation split of its training corpus, or its validation file) if "
                   f"present and unchanged: its first {dynamic_run.TUNE_TOKENS:,} tokens, or its last where "
                   "those overlap the scored text; else no tuning].")
@click.option("--encoding", default="utf-8", show_default=True, callback=text_encoding)
@click.option("--errors", type=click.Choice(["strict", "replace", "ignore"]), default="strict", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@max_memory_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def score_command(args, document, fmt, show_tokens, strict, batch_size, streams, dynamic, dynamic_lr, dynamic_decay,
                  dynamic_segment, dynamic_stats, dynamic_tune, encoding, errors, device, max_memory, quiet):
    """Score text: [MODEL] [FILE|-]. Each line of FILE (or stdin) is a sentence; prints its
    log-probability, tokens, nats and bits per token and perplexity, then a summary.
    MODEL defaults to the bundled Shakespeare model."""
    if len(args) > 2:
        raise click.UsageError("expected at most MODEL and FILE")
    settings = dyn.DynamicSettings(dynamic_lr, dynamic_decay, dynamic_segment, dynamic_stats, dynamic_tune)
    if dynamic:
        if not document:
            raise click.UsageError("--dynamic adapts the model along one text: it needs --document")
        if streams > 1:
            raise click.UsageError("--dynamic reads the text as one stream: it cannot be used with --streams")
        if dynamic_tune is not None and dynamic_lr is not None and dynamic_decay is not None:
            raise click.UsageError("--dynamic-tune has nothing to choose: --dynamic-lr and --dynamic-decay are both given")
    elif settings.given():
        raise click.UsageError(f"--dynamic-{settings.given()[0]} applies to --dynamic only")
    run_score(args, document, fmt, show_tokens, strict, batch_size, streams, encoding, errors, device, quiet=quiet,
              dynamic=settings if dynamic else None, max_memory=max_memory)
