"""`charnn export`: a model's weights as a safetensors file under PyTorch's names."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..io import safetensors_file
from ..io.checkpoint import CheckpointError, load, resolve
from ..io.fileio import file_kind
from ..training.folder import run_file
from .common import fail


def run_export(model, out):
    try:
        import safetensors  # noqa: F401
    except ImportError:
        fail("charnn export needs the safetensors package: pip install safetensors")
    out = Path(out)
    if file_kind(out):
        fail(f"{out}: is {file_kind(out)}; name a file to write (e.g. model.safetensors)")
    try:
        path = resolve(model)
        refuse_own_files(path, out)
        ckpt = load(path)
    except CheckpointError as e:
        fail(str(e))
    try:
        safetensors_file.save(out, ckpt.config, ckpt.vocab.to_json(), ckpt.params, ckpt.meta)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    tensors = safetensors_file.torch_shapes(ckpt.config)
    click.echo(f"wrote {out} ({out.stat().st_size:,} bytes): {len(tensors)} tensors, "
               f"vocabulary and configuration in the metadata")
    for name, shape in tensors.items():
        click.echo(f"  {name:<22} {tuple(shape)}")


def refuse_own_files(model: Path, out: Path):
    """Refuse (exit 1) an ``out`` that would replace the model being exported or a file that
    training keeps in a run folder (its checkpoints, metrics, corpus copy, token caches),
    symbolic and hard links included: the export would replace it with a safetensors file."""
    if os.path.realpath(out) == os.path.realpath(model) or (out.exists() and os.path.samefile(out, model)):
        fail(f"{out}: is the model file being exported ({model}); name another file to write "
             f"(e.g. {model.with_name(model.stem + '-export.safetensors')})")
    what = run_file(out)
    if what:
        folder = Path(os.path.realpath(out)).parent
        fail(f"{out}: is {what} of the run folder {folder}, which export would replace; name another file "
             f"(e.g. {folder / 'model.safetensors'})")


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("out", type=click.Path(dir_okay=False))
def export_command(model, out):
    """Write MODEL (a model file or run folder) to OUT as a safetensors file under PyTorch's names
    (embedding.weight, rnn.weight_ih_l0, ..., decoder.weight), for nn.Embedding, nn.RNN/LSTM/GRU
    and nn.Linear; the vocabulary and configuration go in its metadata. charnn sample and
    score read such files too. OUT may not be MODEL's own file or one that training keeps in
    a run folder (model.npz, last.npz, metrics.jsonl, ...): export refuses it.

    \b
      charnn export models/default shakespeare.safetensors
      charnn sample shakespeare.safetensors -n 100
    """
    run_export(model, out)
