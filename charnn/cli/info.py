"""`charnn info`: what a model file holds (architecture, size, vocabulary, training), for people
or, with --json, for programs. Fields an older or foreign file lacks are "unknown" (null in JSON)."""

from __future__ import annotations

import math
import sys

import click

from ..io.checkpoint import CheckpointError, load, resolve
from ..nn import cells
from .common import fail, json_line

SHOWN_TOKENS = 12


def describe(model) -> dict:
    """The facts about MODEL (a model file, a run folder, or None for the bundled default)."""
    try:
        path = resolve(model)
        ckpt = load(path)
    except CheckpointError as e:
        fail(str(e))
    c, v, meta = ckpt.config, ckpt.vocab, ckpt.meta
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    progress = meta.get("progress") if isinstance(meta.get("progress"), dict) else {}

    def known(d, key, kind=(int, float)):
        x = d.get(key)
        return x if isinstance(x, kind) and not isinstance(x, bool) else None

    return {
        "path": str(path),
        "format": "charnn" if _is_zip(path) else "safetensors",
        "file_bytes": path.stat().st_size,
        "resumable": bool(ckpt.optim),
        "cell": c.cell, "layers": c.layers, "hidden": c.hidden, "embed": c.embed,
        "activation": c.activation if len(cells.get(c.cell).activations) > 1 else None, "tie": c.tie,
        "dropout": c.dropout,
        "classes": c.n_classes, "parameters": c.n_params(),
        "vocab": {"level": v.level, "size": len(v), "tokenizer": v.tokenizer if v.level == "word" else None,
                  "first": v.tokens[:SHOWN_TOKENS]},
        "corpus": known(train, "corpus", str), "corpus_sha256": known(meta, "corpus_sha256", str),
        "steps": known(progress, "step", int), "tokens": known(progress, "tokens", int),
        "train_seconds": known(progress, "train_seconds"),
        "val_loss": known(progress, "last_val"), "best_val_loss": known(progress, "best_saved"),
        "created": known(meta, "created", str),
    }


def _is_zip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def text(d: dict) -> str:
    def num(x, fmt="{:,}"):
        return "unknown" if x is None else fmt.format(x)

    level = "characters" if d["vocab"]["level"] == "char" else f"words ({d['vocab']['tokenizer']} tokenizer)"
    shown = " ".join(repr(t) for t in d["vocab"]["first"]) + (" ..." if d["vocab"]["size"] > SHOWN_TOKENS else "")
    arch = [f"{d['cell']}" + (f" ({d['activation']})" if d["activation"] else ""),
            f"{d['layers']} layer{'s' * (d['layers'] > 1)} x {d['hidden']} hidden",
            f"embedding {d['embed']}" if d["embed"] else f"one-hot input ({d['vocab']['size']})",
            f"class-factored softmax ({d['classes']} classes)" if d["classes"] else "full softmax"]
    if d["tie"]:
        arch.append("tied output weights")
    if d["dropout"]:
        arch.append(f"dropout {d['dropout']:g}")
    corpus = "unknown" if d["corpus_sha256"] is None else f"sha256 {d['corpus_sha256']}"
    if d["corpus"]:
        corpus = f"{d['corpus']} ({corpus})"
    if d["val_loss"] is None:
        val = "unknown"
    else:
        val = f"{d['val_loss']:.4f} nats/token ({d['val_loss'] / math.log(2):.4f} bits) at step {num(d['steps'])}"
        if d["best_val_loss"] is not None:
            val += ", the best of the run" if d["best_val_loss"] >= d["val_loss"] else \
                f"; the best of the run: {d['best_val_loss']:.4f}"
    kind = "charnn model file" + (", a resumable checkpoint" if d["resumable"] else "") \
        if d["format"] == "charnn" else "safetensors, PyTorch names"
    rows = [
        ("architecture", ", ".join(arch)),
        ("parameters", f"{d['parameters']:,}"),
        ("vocabulary", f"{d['vocab']['size']:,} {level}: {shown}"),
        ("corpus", corpus),
        ("trained", f"{num(d['steps'])} steps, {num(d['tokens'])} tokens, "
                    f"{num(d['train_seconds'], '{:,.0f}')} s of compute"),
        ("validation", val),
        ("saved", d["created"] or "unknown"),
    ]
    return f"{d['path']} ({kind}, {d['file_bytes']:,} bytes)\n" + "".join(f"  {k:<13} {v}\n" for k, v in rows)


def run_info(model, as_json):
    d = describe(model)
    sys.stdout.write(json_line(d) if as_json else text(d))


@click.command("info")
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (null where a field is unknown).")
def info_command(model, as_json):
    """Show what MODEL holds (a model file, run folder or .safetensors; default: the bundled
    Shakespeare model): architecture, parameter count, file size, vocabulary, the training
    corpus's digest, steps, tokens, validation loss and when it was saved.

    \b
      charnn info                      the bundled model
      charnn info models/run --json    for programs
    """
    run_info(model, as_json)
