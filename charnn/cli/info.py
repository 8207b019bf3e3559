"""`charnn info`: what a model file holds (architecture, size, vocabulary, training), for people
or, with --json, for programs. Fields an older or foreign file lacks are "unknown" (null in JSON)."""

from __future__ import annotations

import math
import sys

import click

from ..io.checkpoint import CheckpointError, load, resolve
from ..nn import cells
from .common import fail, json_line
from .options import BATCH_SIZE, SEQ_LEN

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
        "activation": c.activation if cells.get(c.cell).takes_activation else None, "tie": c.tie,
        "dropout": c.dropout,
        "classes": c.n_classes, "parameters": c.n_params(),
        "vocab": {"level": v.level, "size": len(v), "tokenizer": v.tokenizer if v.level == "word" else None,
                  "first": v.tokens[:SHOWN_TOKENS]},
        "corpus": known(train, "corpus", str), "corpus_sha256": known(meta, "corpus_sha256", str),
        "steps": known(progress, "step", int), "tokens": known(progress, "tokens", int),
        "train_seconds": known(progress, "train_seconds"),
        "val_loss": known(progress, "last_val"), "best_val_loss": known(progress, "best_saved"),
        "created": known(meta, "created", str),
        "policy": known(meta.get("policy") if isinstance(meta.get("policy"), dict) else {}, "line", str),
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
    if d["policy"]:
        rows.insert(1, ("policy", d["policy"]))
    return f"{d['path']} ({kind}, {d['file_bytes']:,} bytes)\n" + "".join(f"  {k:<13} {v}\n" for k, v in rows)


def run_info(model, as_json):
    d = describe(model)
    sys.stdout.write(json_line(d) if as_json else text(d))


def run_plan(model, N: int, T: int, measure: bool, as_json: bool):
    """`charnn info --plan`: the CPU engine's path for MODEL's work of N streams x T steps."""
    from ..backend import BackendError, get_backend
    from ..engine.cpu import plan_report
    from ..io.checkpoint import load_model

    try:
        path = resolve(model)
        lm, _, _ = load_model(path, get_backend("cpu", "float32"))
    except (CheckpointError, BackendError) as e:
        fail(str(e))
    report = {"path": str(path), **plan_report(lm, N, T, measure)}
    sys.stdout.write(json_line(report) if as_json else plan_text(report, lm.config))


def plan_text(r: dict, config) -> str:
    from ..engine.plan import TRIES

    c = config
    arch = f"{c.cell}, {c.layers} layer{'s' * (c.layers > 1)} x {c.hidden} hidden"
    lines = [f"{r['path']}: {arch}; {r['batch']} streams x {r['seq_len']} steps"]
    if not r["kinds"]:
        return "\n".join(lines + [f"  engine        {r['engine']} (no CPU engine: nothing to plan)"]) + "\n"
    s = r["settings"]
    free = " and ".join({"split": "the split over threads", "packed": "the packed products"}[k] for k in s["plans"])
    lines.append(f"  settings      {s['threads']} thread{'s' * (s['threads'] > 1)}, compiled kernels "
                 f"{'on' if s['kernels'] else 'off'}, compiled loops {'on' if s['loops'] else 'off'}, packed products "
                 f"{'allowed' if s['packed'] else 'off'}; the planner chooses {free or 'nothing'}")
    if "machine" in r:
        m = r["machine"]
        lines.append(f"  machine       {m['cpu']}; numpy {m['numpy']}; {m['blas']}; numba {m['numba']}; engine {m['engine']}")
        lines.append(f"  plan file     {r['file']}")
    for kind, d in r["kinds"].items():
        if d["path"] is None:
            lines.append(f"  {kind:<13} {d['why']}; the rules would run: {d['rule']}")
            continue
        if d["why"] != "measured":
            lines.append(f"  {kind:<13} {d['path']} (the rules: {d['why']})")
            continue
        e = d["plan"]
        lines.append(f"  {kind:<13} {d['path']} (measured {e['measured']} in {e['measuring_seconds']:.2f} s; the rules': "
                     f"{d['rule']})")
        if e.get("loaded"):
            lines.append(f"    other work took {100 * e['others']:.0f}% of the CPUs while it measured: provisional, "
                         f"measured again by the next processes ({e.get('tries', 1)} of {TRIES} tries so far)")
        for label in d["candidates"]:
            if label in e["seconds"]:
                n = e.get("runs", {}).get(label)
                how = f"{1e3 * e['seconds'][label]:9.2f} ms  fastest of {n} runs of all {e['steps']} steps"
            elif label in e["estimates"]:
                how = (f"{1e3 * e['estimates'][label]:9.2f} ms  estimated from its first 1 and {e['estimate_steps']} "
                       "steps (dropped, or no time left)")
            else:
                how = f"{'not timed':>9}     (the budget went on compiling)"
            lines.append(f"    {'*' if label == d['path'] else ' '} {label:<28} {how}")
    if r.get("sample"):
        lines.append(f"  {'sample':<13} {'; '.join(r['sample']['modes'])}: {r['sample']['why']}")
    return "\n".join(lines) + "\n"


@click.command("info")
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (null where a field is unknown).")
@click.option("--plan", "show_plan", is_flag=True,
              help="Show the CPU engine's path for MODEL's training steps and scoring passes, and why.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True,
              help="With --plan: the streams of the work (train's default).")
@click.option("--seq-len", type=click.IntRange(min=1), default=SEQ_LEN, show_default=True,
              help="With --plan: the time steps of the work (train's default).")
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
    if not show_plan:
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in ("batch_size", "seq_len", "measure")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)}: needs --plan")
        run_info(model, as_json)
        return
    run_plan(model, batch_size, seq_len, measure, as_json)
