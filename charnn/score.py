"""Scoring text: how likely a model finds each sentence, or a whole document.

Sentence mode: every non-blank line is scored on its own, starting from a zero state with the
line separator as context (a newline at char level, ``<eos>`` at word level), and predicting each
token and then the separator that ends the line, so a sentence's score includes its end (as in
the RNN language-model tutorial). Lines are scored in batches: padded to the longest line of the
batch and masked, so padding never changes a score.

Document mode: the whole text is one token stream, predicted from the separator onwards with
the state carried across chunks (as training's validation does), for held-out evaluation.

Log-probabilities are natural logs (nats); bits = nats / ln 2; perplexity = exp(nats per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy

from . import memory
from .backend import to_host
from .io.data import EvalStreams
from .nn.functional import perplexity
from .nn.model import LanguageModel
from .io.vocab import Vocab
from .wording import plural

LN2 = math.log(2)

# progress(done, total): called as the work goes (lines for score_lines, predicted tokens for
# score_document), first with done = 0; for a display, so it must not raise.
Progress = Optional[Callable[[int, int], None]]


class ScoreError(ValueError):
    """Text that cannot be scored as asked (e.g. unknown characters with strict=True)."""


@dataclass
class Scored:
    """The score of one sentence (or a document)."""

    text: str
    tokens: int  # predicted tokens (the end of line included)
    logprob: float  # total log-probability in nats (<= 0)
    excluded: int = 0  # unknown characters left out
    token_strings: list = field(default_factory=list)
    surprisal: list = field(default_factory=list)  # per predicted token, in bits

    @property
    def nats_per_token(self) -> float:
        return -self.logprob / self.tokens if self.tokens else 0.0

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / LN2

    @property
    def perplexity(self) -> float:
        return perplexity(self.nats_per_token)

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "logprob": self.logprob,
                "nats_per_token": self.nats_per_token, "bits_per_token": self.bits_per_token,
                "perplexity": self.perplexity, "excluded": self.excluded}


def surprisal_pairs(s: Scored) -> list:
    """[[token, bits], ...] of a Scored made with tokens, bits rounded to 4 places."""
    return [[t, round(b, 4)] for t, b in zip(s.token_strings, s.surprisal)]


def score_row(s: Scored, index: int, with_tokens: bool = False) -> dict:
    """One line's object of ``charnn score --format jsonl`` (and of the server's /v1/score):
    the score, its 1-based ``index`` among the scored lines, and with ``with_tokens`` each
    token's surprisal."""
    obj = s.to_json()
    obj["index"] = index
    if with_tokens:
        obj["token_surprisal_bits"] = surprisal_pairs(s)
    return obj


def summarize(items: list[Scored]) -> dict:
    tokens = sum(s.tokens for s in items)
    logprob = sum(s.logprob for s in items)
    nats = -logprob / tokens if tokens else 0.0
    return {"summary": True, "lines": len(items), "tokens": tokens, "logprob": logprob,
            "nats_per_token": nats, "bits_per_token": nats / LN2, "perplexity": perplexity(nats),
            "excluded": sum(s.excluded for s in items)}


def separator_id(vocab: Vocab) -> int:
    """The id that ends every scored line; an error for a model that never saw one."""
    sep = vocab.separator_id
    if sep is None:
        raise ScoreError("this model never saw a newline, so it cannot score lines; use --document")
    return sep


def encode_known(vocab: Vocab, text: str, strict: bool, where: str = ""):
    """(ids, token strings, excluded count). Char level: unknown characters are dropped and
    counted, or an error naming them (and where) with ``strict``. Word level: unknown words are
    scored as <unk>."""
    ids = vocab.encode(text)
    toks = vocab.tokenize(text)
    if vocab.level == "char":
        bad = ids < 0
        if bad.any():
            if strict:
                pos = int(numpy.argmax(bad))
                chars = sorted({toks[i] for i in numpy.flatnonzero(bad)})
                raise ScoreError(f"{where}character {chars[0]!r} at column {pos + 1} is not in the model's vocabulary"
                                 + (f" (and {len(chars) - 1} more unknown)" if len(chars) > 1 else ""))
            keep = ~bad
            return ids[keep], [t for t, k in zip(toks, keep) if k], int(bad.sum())
    return ids, toks, 0


def unknown_report(vocab: Vocab, lines: list[str]) -> list[tuple[int, int, str]]:
    """(line number, column, character) of every character outside a char vocabulary."""
    out = []
    if vocab.level != "char":
        return out
    for n, line in enumerate(lines, 1):
        ids = vocab.encode(line)
        for col in numpy.flatnonzero(ids < 0):
            out.append((n, int(col) + 1, line[col]))
    return out


def score_lines(model: LanguageModel, vocab: Vocab, lines: list[str], batch_size: int = 64,
                strict: bool = False, with_tokens: bool = False, progress: Progress = None,
                max_memory: int | None = None) -> list[Scored]:
    """Score each line as a sentence (see the module docstring). Blank lines are skipped.

    Args:
        progress: called with (lines scored, lines to score) before the first batch and after
            each one; blank lines are not counted.
        max_memory: bytes the scoring may use (default: the memory available); the largest
            batch, padded to its longest line, is checked against it before any is scored
            (memory.MemoryLimitError).
    """
    sep = separator_id(vocab)
    items, numbers = [], []  # numbers: each item's line number
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        body = line if vocab.level == "char" else line
        ids, toks, excluded = encode_known(vocab, body, strict, where=f"line {n}: ")
        if vocab.level == "word":
            ids, toks = ids[:-1], toks[:-1]  # encode() ends a line with <eos>; added below
        seq = numpy.concatenate([ids, [sep]]).astype(numpy.int64)
        items.append((line, seq, toks + [vocab.separator], excluded))
        numbers.append(n)
    # Longest first, so each batch is padded little; results return in input order.
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
    if order:  # the first batch is the largest: its longest line is the longest
        _check_batch_memory(model, len(items[order[0]][1]), min(batch_size, len(order)), batch_size,
                            numbers[order[0]], max_memory)
    results: list[Scored | None] = [None] * len(items)
    if progress:
        progress(0, len(items))
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        T = len(items[batch[0]][1])
        N = len(batch)
        x = numpy.full((T, N), sep, dtype=numpy.int64)
        y = numpy.full((T, N), sep, dtype=numpy.int64)
        w = numpy.zeros((T, N))
        for j, i in enumerate(batch):
            seq = items[i][1]
            L = len(seq)
            x[0, j] = sep
            x[1:L, j] = seq[:-1]
            y[:L, j] = seq
            w[:L, j] = 1.0
        nll, _ = model.nll(x, y, None)
        nll = to_host(nll).astype(numpy.float64) * w  # (T, N); padding masked out
        for j, i in enumerate(batch):
            line, seq, toks, excluded = items[i]
            L = len(seq)
            s = Scored(text=line, tokens=L, logprob=-float(nll[:L, j].sum()), excluded=excluded)
            if with_tokens:
                s.token_strings = toks
                s.surprisal = list(nll[:L, j] / LN2)
            results[i] = s
        if progress:
            progress(start + N, len(items))
    return results


def _check_batch_memory(model, T: int, N: int, batch_size: int, line: int, max_memory):
    """Refuse a batch of N lines padded to T tokens that would pass the memory available or
    ``max_memory``: blaming --batch-size where one line alone would fit, else the line."""
    shape, D = memory.Shape.of(model.config), numpy.dtype(model.dtype).itemsize
    if N > 1 and memory.fits(memory.inference(shape, T, 1, D), max_memory):
        subject = f"--batch-size {batch_size}"
    else:
        subject = f"line {line} ({plural(T - 1, 'token')}; --document scores a text of any length in pieces)"
    memory.check(memory.inference(shape, T, N, D), subject, max_memory)


def stream_losses(model: LanguageModel, streams: EvalStreams, columns: tuple[int, int] | None = None):
    """The evaluation loop that validation and document scoring share: for each chunk k of
    ``streams``, with the state carried from chunk to chunk and no dropout, yield (k, nll, w):
    the loss of every prediction (T', N') on the model's device and the weights (T', N') that
    mask the last stream's padding. ``columns`` (a, b) evaluates streams a..b-1 only (one
    data-parallel rank's share)."""
    state = None
    for k in range(len(streams)):
        x, y, w = streams.chunk(k)
        if columns is not None:
            a, b = columns
            x, y, w = x[:, a:b], y[:, a:b], w[:, a:b]
        nll, state = model.nll(x, y, state)
        yield k, nll, w


def score_document(model: LanguageModel, vocab: Vocab, text: str, streams: int = 1, seq_len: int = 200,
                   strict: bool = False, with_tokens: bool = False, progress: Progress = None,
                   max_memory: int | None = None) -> Scored:
    """Score ``text`` as one token stream with carried state, every token predicted once, the
    first from the separator (newline or <eos>) as context.

    With ``streams`` > 1 the text is cut into that many contiguous pieces scored side by side
    (faster; each piece starts from a zero state but with its preceding token as context), as
    training's validation does (data.EvalStreams).

    ``progress`` is called with (tokens predicted, tokens to predict) before the first chunk and
    after each one. Streams whose chunks would pass the memory available (or ``max_memory``
    bytes) are refused (memory.MemoryLimitError) before any is scored."""
    ids, toks, excluded = encode_known(vocab, text, strict)
    seq = numpy.concatenate([[vocab.start_id], ids]).astype(numpy.int64)
    if len(seq) < 2:
        return Scored(text=text, tokens=0, logprob=0.0, excluded=excluded)
    es = EvalStreams(seq, streams, seq_len)
    need = memory.inference(memory.Shape.of(model.config), min(es.T, es.S), es.N, numpy.dtype(model.dtype).itemsize)
    memory.check(need, f"--streams {streams}", max_memory)
    nll_all = numpy.zeros((es.N, es.S))
    done = 0
    if progress:
        progress(0, es.predictions)
    for k, nll, w in stream_losses(model, es):
        nll_all[:, k * es.T: k * es.T + nll.shape[0]] = (to_host(nll).astype(numpy.float64) * w).T
        if progress:
            done += int(w.sum())
            progress(done, es.predictions)
    flat = nll_all.reshape(-1)[: es.predictions]  # stream-major order is text order
    s = Scored(text=text, tokens=es.predictions, logprob=-float(flat.sum()), excluded=excluded)
    if with_tokens:
        s.token_strings = toks
        s.surprisal = list(flat / LN2)
    return s
