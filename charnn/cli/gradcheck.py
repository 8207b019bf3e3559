"""`charnn gradcheck`: runs the checks of gradcheck.py and reports them as a table."""

from __future__ import annotations

import click
import numpy
from rich.table import Table

from ..backend import DEVICES, BackendError, get_backend
from ..gradcheck import check_config, check_memory, check_model, count_checks, random_chunk
from ..io.checkpoint import CheckpointError, load, resolve
from ..io.data import CorpusError, read_text
from ..memory import MemoryLimitError
from ..nn import cells
from ..nn.functional import class_bounds
from ..nn.model import LanguageModel, ModelConfig
from ..wording import plural
from .common import Finite, StdoutConsole, regular_file
from .options import CellChoice, int_list, max_memory_option
from .progress import WorkProgress

VOCAB_SIZES = {"char": 7, "word": 40}


def run_gradcheck(model, cells, layers, hidden, embeds, seq_len, batch_size, levels, dropout,
                  text_path, seed, tolerance, max_elements, device, classes=6, quiet=False, max_memory=None):
    try:
        _run_gradcheck(model, cells, layers, hidden, embeds, seq_len, batch_size, levels, dropout, text_path, seed,
                       tolerance, max_elements, device, classes, quiet, max_memory)
    except MemoryLimitError as e:
        raise click.ClickException(str(e)) from None


def _run_gradcheck(model, cells, layers, hidden, embeds, seq_len, batch_size, levels, dropout,
                   text_path, seed, tolerance, max_elements, device, classes, quiet, max_memory):
    console = StdoutConsole()
    try:
        get_backend(device, "float64")
    except BackendError as e:
        raise click.ClickException(str(e)) from None
    runs = []  # (label, results)
    if model is not None:
        with WorkProgress("checking", "checks", quiet=quiet) as progress:
            runs.append(_check_trained(model, text_path, seq_len, batch_size, seed, tolerance,
                                       max_elements or 40, device, progress, max_memory))
    else:
        planned = []  # (label, config)
        for cell in cells:
            for n_layers in layers:
                for embed in embeds:
                    for level in levels:
                        if n_layers < 1 or embed < 0:
                            raise click.BadParameter("layers must be >= 1 and embed >= 0")
                        V = VOCAB_SIZES[level]
                        bounds = ()
                        if level == "word" and classes:
                            # Zipf-like counts, as words have, binned into classes.
                            bounds = tuple(class_bounds(1.0 / numpy.arange(1, V + 1), classes))
                        cfg = ModelConfig(vocab_size=V, cell=cell, layers=n_layers, hidden=hidden, embed=embed,
                                          dropout=dropout, class_bounds=bounds)
                        label = (f"{cell} {n_layers}x{hidden} {'one-hot' if embed == 0 else f'embed {embed}'} {level}"
                                 + (f" {plural(len(bounds) - 1, 'class')}" if bounds else ""))
                        planned.append((label, cfg))
        for _, cfg in planned:  # every one before the first runs
            check_memory(cfg, seq_len, batch_size, max_memory)
        total = sum(count_checks(cfg) for _, cfg in planned)
        with WorkProgress("checking", "checks", quiet=quiet) as progress:
            done = 0
            for label, cfg in planned:
                def step(k, _n, label=label, done=done):
                    progress(done + k, total, description=label)
                runs.append((label, check_config(cfg, T=seq_len, N=batch_size, seed=seed, tolerance=tolerance,
                                                 device=device, max_elements=max_elements or 300, progress=step,
                                                 max_memory=max_memory)))
                done += len(runs[-1][1])
    table = Table(title=f"Gradient check (float64, tolerance {tolerance:g})")
    for col in ("model", "parameter", "shape", "checked", "max rel error", ""):
        table.add_column(col, justify="right" if col in ("checked", "max rel error") else "left")
    failures = []
    for label, results in runs:
        for r in results:
            ok = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
            table.add_row(label, r.name, "x".join(map(str, r.shape)), str(r.checked), f"{r.max_rel_error:.2e}", ok)
            if not r.passed:
                failures.append(f"{label}: {r.name} ({r.max_rel_error:.2e})")
        table.add_section()
    console.print(table)
    n = sum(len(r) for _, r in runs)
    if failures:
        raise click.ClickException(f"{len(failures)} of {n} gradient checks failed: " + "; ".join(failures[:5])
                                   + (" ..." if len(failures) > 5 else ""))
    worst = max((r.max_rel_error for _, rs in runs for r in rs), default=0.0)
    console.print(f"all {n} gradient checks passed (worst max relative error {worst:.2e})")


def _check_trained(path, text_path, seq_len, batch_size, seed, tolerance, max_elements, device, progress=None,
                   max_memory=None):
    try:
        ckpt = load(resolve(path), "float64")  # (gradient checks compute in float64)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    check_memory(ckpt.config, seq_len, batch_size, max_memory, loaded=True)
    vocab = ckpt.vocab
    model = LanguageModel(ckpt.config, ckpt.params, get_backend(device, "float64"))
    T, N = seq_len, batch_size
    if text_path:
        regular_file(text_path)
        try:
            text = read_text(text_path)
        except CorpusError as e:
            raise click.ClickException(str(e)) from None
        ids = vocab.encode(text)
        ids = ids[ids >= 0]
        if len(ids) < T * N + 1:
            raise click.ClickException(f"{text_path}: too short for --seq-len {T} x --batch-size {N} known tokens")
        ids = ids[: T * N + 1]
        x = ids[:-1].reshape(N, T).T
        y = ids[1:].reshape(N, T).T
    else:
        x, y = random_chunk(ckpt.config.vocab_size, T, N, seed)
    cfg = ckpt.config
    label = f"{cfg.cell} {cfg.layers}x{cfg.hidden} ({path})"
    return label, check_model(model, numpy.ascontiguousarray(x), numpy.ascontiguousarray(y),
                              tolerance=tolerance, max_elements=max_elements, seed=seed, progress=progress)


@click.command("gradcheck", epilog="""\b
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
@max_memory_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def gradcheck_command(model, cell, layers, hidden, embed, seq_len, batch_size, level, dropout, classes, text_path, seed,
              tolerance, max_elements, device, max_memory, quiet):
    """Compare the analytic gradients with numerical ones (float64, central differences).

    Without MODEL, builds small models for every combination of the options; with MODEL
    (a model file or run folder), checks that architecture with its trained weights.
    Exits 0 when every parameter passes, 1 naming the ones that fail.
    """
    run_gradcheck(model=model, cells=tuple(cells.CELLS) if cell == "all" else (cell,), layers=layers,
                  hidden=hidden, embeds=embed, seq_len=seq_len, batch_size=batch_size,
                  levels=("char", "word") if level == "both" else (level,), dropout=dropout,
                  text_path=text_path, seed=seed, tolerance=tolerance, max_elements=max_elements,
                  device=device, classes=classes, quiet=quiet, max_memory=max_memory)
