"""`charnn sample`: streams generated text to stdout."""

from __future__ import annotations

import sys

import click
import numpy

from ..backend import BackendError, get_backend
from ..io.checkpoint import CheckpointError, load_model, resolve
from ..sample import SampleError, beam_search, generate, prime_ids
from .common import compile_notice, json_line


def load_for_use(model, device, quiet=False, with_checkpoint=False):
    """(model, vocab, path) for sample/score: MODEL (checkpoint.resolve: a file, a run folder
    or None for the bundled default) on ``device``, ``path`` its model file; says when the
    engine will compile first (unless ``quiet``). ``with_checkpoint``: the checkpoint (its
    metadata) too, as a fourth item."""
    try:
        path = resolve(model)
        backend = get_backend(device, "float32", announce=False)
        lm, vocab, ckpt = load_model(path, backend)
    except (CheckpointError, BackendError) as e:
        raise click.ClickException(str(e)) from None
    compile_notice(backend.device, quiet)
    return (lm, vocab, path, ckpt) if with_checkpoint else (lm, vocab, path)


def run_sample(model, length, temperature, top_k, top_p, prime, seed, num_samples, stop_at, beam_size, device, as_json,
               no_repeat=None):
    lm, vocab, path = load_for_use(model, device)
    try:
        prime_ids(vocab, prime)  # a bad prime is an error before anything is written to stdout
    except SampleError as e:
        raise click.ClickException(str(e)) from None
    if seed is None:
        seed = int(numpy.random.default_rng().integers(2**31))
    out = sys.stdout
    for k in range(num_samples):
        rng = numpy.random.default_rng([seed, k])
        logprob = None
        made = []
        try:
            if beam_size:
                text, logprob = beam_search(lm, vocab, length, beam_size, prime, no_repeat)
                pieces = [text]
            else:
                pieces = generate(lm, vocab, length, temperature, top_k, top_p, prime, rng, stop_at=None)
            if not as_json:
                out.write(prime)
            for piece in pieces:
                made.append(piece)
                if not as_json:
                    out.write(piece)
                    out.flush()
                if stop_at and "".join(made[-len(stop_at):]).endswith(stop_at):
                    break
        except SampleError as e:
            raise click.ClickException(str(e)) from None
        text = "".join(made)
        if as_json:
            obj = {"sample": k, "seed": seed, "prime": prime, "text": text, "model": str(path)}
            if beam_size:
                del obj["seed"]  # beam search draws nothing
                obj["beam_size"] = beam_size
            if logprob is not None:
                obj["logprob"] = logprob
            out.write(json_line(obj))
        else:
            if not (prime + text).endswith("\n"):
                out.write("\n")
            if k + 1 < num_samples:
                out.write("\n")
        out.flush()
