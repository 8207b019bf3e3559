"""`charnn export`: a model's weights as a safetensors file under PyTorch's names."""

from __future__ import annotations

from pathlib import Path

import click

from ..io import safetensors_file
from ..io.checkpoint import CheckpointError, load, resolve
from ..io.fileio import file_kind
from .common import fail, regular_file


def run_export(model, out):
    try:
        import safetensors  # noqa: F401
    except ImportError:
        fail("charnn export needs the safetensors package: pip install safetensors")
    out = Path(out)
    if file_kind(out):
        fail(f"{out}: is {file_kind(out)}; name a file to write (e.g. model.safetensors)")
    try:
        regular_file(resolve(model), "model file")
        ckpt = load(model)
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


@click.command("export")
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
    run_export(model, out)
