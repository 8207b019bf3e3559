"""`charnn sample`: streams generated text to stdout."""

from __future__ import annotations

import sys

import click
import numpy

from ..backend import DEVICES, BackendError, get_backend
from ..io.checkpoint import CheckpointError, load_model, resolve
from ..memory import MemoryLimitError
from ..sample import (NO_REPEAT, SampleError, beam_search, check_beam_memory, check_prime_memory, generate,
                      start_ids)
from .common import Finite, compile_notice, json_line
from .options import max_memory_option, unescape


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
                pieces = generate(lm, vocab, length, temperature, top_k, top_p, prime, rng, stop_at=stop_at,
                                  max_memory=max_memory)
            if not as_json:
                out.write(prime)
            for piece in pieces:
                made.append(piece)
                if not as_json:
                    out.write(piece)
                    out.flush()
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


@click.command("sample", epilog="""\b
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
@click.option("--stop-at", default=None, callback=unescape, help='End a sample as soon as its generated text contains this (kept), e.g. "\\n\\n" or ".".')
@click.option("--beam-size", type=click.IntRange(min=1), default=None, help="Beam search for the most likely continuation instead of sampling.")
@click.option("--no-repeat-ngram", type=click.IntRange(min=0), default=None,
              help="--beam-size: no n-gram of this many tokens twice in the text [8 characters, 3 words; 0 = off].")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@max_memory_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample on stdout.")
@click.pass_context
def sample_command(ctx, model, length, temperature, top_k, top_p, prime, seed, num_samples, stop_at, beam_size,
                   no_repeat_ngram, device, max_memory, as_json):
    """Generate text from MODEL (a model file or run folder; default: the bundled
    Shakespeare model). Tokens stream to stdout as they are generated."""
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
               no_repeat=no_repeat_ngram, max_memory=max_memory)
