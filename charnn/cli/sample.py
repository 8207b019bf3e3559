"""`charnn sample`: streams generated text to stdout."""

from __future__ import annotations

import sys

import click
import numpy

from ..backend import BackendError, get_backend
from ..io.checkpoint import CheckpointError, default_model_path, load_model, resolve
from ..memory import MemoryLimitError
from ..sample import (NO_REPEAT, SampleError, beam_search, check_beam_memory, check_prime_memory, generate,
                      start_ids)
from .common import compile_notice, json_line, regular_file


def model_path(model):
    """MODEL (a model file or run folder) or the bundled default, refused (CheckpointError, or
    exit 1) unless it resolves to a regular file: np.load would wait on a FIFO forever."""
    path = model if model is not None else default_model_path()
    regular_file(resolve(path), "model file")
    return path


def load_for_use(model, device, quiet=False, with_checkpoint=False):
    """(model, vocab, path) for sample/score: MODEL or the bundled default, on ``device``;
    says when the engine will compile first (unless ``quiet``). ``with_checkpoint``: the
    checkpoint (its metadata) too, as a fourth item."""
    try:
        path = model_path(model)
        backend = get_backend(device, "float32", announce=False)
        lm, vocab, ckpt = load_model(path, backend)
    except (CheckpointError, BackendError) as e:
        raise click.ClickException(str(e)) from None
    compile_notice(backend.device, quiet)
    return (lm, vocab, path, ckpt) if with_checkpoint else (lm, vocab, path)


def run_sample(model, length, temperature, top_k, top_p, prime, seed, num_samples, stop_at, beam_size, device, as_json,
               no_repeat=None, max_memory=None):
    lm, vocab, path = load_for_use(model, device)
    try:
        # A bad prime, or one or a beam that would pass the memory available, is an error
        # before anything is written to stdout.
        ids = start_ids(vocab, prime)
        if beam_size:
            n = NO_REPEAT[vocab.level] if no_repeat is None else no_repeat
            check_beam_memory(lm, length, beam_size, len(ids), n, max_memory)
        else:
            check_prime_memory(lm, ids, max_memory)
    except (SampleError, MemoryLimitError) as e:
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
                text, logprob = beam_search(lm, vocab, length, beam_size, prime, no_repeat, max_memory)
                pieces = [text]
            else:
                pieces = generate(lm, vocab, length, temperature, top_k, top_p, prime, rng, stop_at=None,
                                  max_memory=max_memory)
            if not as_json:
                out.write(prime)
            for piece in pieces:
                made.append(piece)
                if not as_json:
                    out.write(piece)
                    out.flush()
                if stop_at and "".join(made[-len(stop_at):]).endswith(stop_at):
                    break
        except (SampleError, MemoryLimitError) as e:
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
