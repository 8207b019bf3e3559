"""Generating text: temperature, top-k and top-p (nucleus) sampling, greedy decoding, beam search.

Sampling draws on the host from a NumPy ``Generator``, one token at a time, with the model's
probability vector moved to the host once per step; the same seed gives the same text on
every device. Tokens are yielded as they are made, so callers can stream them.
"""

from __future__ import annotations

from typing import Iterator

import numpy

from . import memory
from .backend import to_device, to_host
from .nn.model import LanguageModel
from .io.vocab import EOS, Vocab


class SampleError(ValueError):
    """Bad sampling options or a prime text the vocabulary cannot encode."""


def filter_probs(logits: numpy.ndarray, temperature: float, top_k: int | None = None,
                 top_p: float | None = None) -> numpy.ndarray:
    """Next-token probabilities (V,) from host logits (V,) after temperature, top-k and top-p.

    top-k keeps the k most likely tokens; top-p keeps the smallest set of most likely tokens
    whose probability reaches p (the token that crosses p is kept). Temperature 0 is greedy:
    all the mass on the argmax.
    """
    logits = numpy.asarray(logits, dtype=numpy.float64)
    V = logits.shape[0]
    if temperature == 0:
        p = numpy.zeros(V)
        p[int(numpy.argmax(logits))] = 1.0
        return p
    z = logits / temperature
    z -= z.max()
    p = numpy.exp(z)
    p /= p.sum()
    if top_k is not None and top_k < V:
        cut = numpy.partition(p, V - top_k)[V - top_k]
        keep = p >= cut
        if keep.sum() > top_k:  # ties at the cut: keep the first k by index order of rank
            order = numpy.argsort(-p, kind="stable")[:top_k]
            keep = numpy.zeros(V, dtype=bool)
            keep[order] = True
        p = numpy.where(keep, p, 0.0)
        p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = numpy.argsort(-p, kind="stable")
        cum = numpy.cumsum(p[order])
        n_keep = int(numpy.searchsorted(cum, top_p * (1 - 1e-12))) + 1
        keep = numpy.zeros(V, dtype=bool)
        keep[order[:n_keep]] = True
        p = numpy.where(keep, p, 0.0)
        p /= p.sum()
    return p


def prime_ids(vocab: Vocab, prime: str, what: str = "--prime") -> numpy.ndarray:
    """Token ids of a prime text. Characters outside a char vocabulary are an error naming
    them (and ``what`` the text is: the option, or the server's field); unknown words map to
    <unk>."""
    if vocab.level == "char":
        unknown = sorted({t for _, t in vocab.unknown(prime)})
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise SampleError(f"{what} has characters the model does not know: {shown}")
        return vocab.encode(prime)
    ids = vocab.encode(prime)
    if len(ids) and ids[-1] == vocab.eos_id and not prime.endswith("\n"):
        ids = ids[:-1]  # a prime without a newline continues its line
    return ids


def start_ids(vocab: Vocab, prime: str = "", what: str = "--prime") -> numpy.ndarray:
    """The tokens generation starts from: the prime's, or with none (or an empty one) the line
    separator, a newline at char level and <eos> at word level, as at the start of a line."""
    ids = prime_ids(vocab, prime, what) if prime else numpy.zeros(0, dtype=numpy.int64)
    if len(ids) == 0:
        ids = numpy.array([vocab.start_id])
    return ids


class StopRule:
    """When generation stops: as soon as the text generated so far (the prime not included)
    contains one of the stop strings; the piece that completes it is the last one yielded.
    The one rule of ``charnn sample --stop-at``, ``api.generate(stop_at=...)`` and the
    server's ``stop``, so a stop string spans token boundaries ("\\n\\n" at char level) and
    is found inside a piece (a word level piece is a whole word). Empty strings never stop.

    ``feed(piece)`` returns whether to stop after this piece; ``matched`` is the stop string
    found; ``cut(text)`` is ``text`` up to where its first stop string begins (OpenAI's API
    returns the text without it)."""

    def __init__(self, stops=None):
        if stops is None:
            stops = ()
        elif isinstance(stops, str):
            stops = (stops,)
        self.stops = tuple(s for s in stops if s)
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._tail = ""
        self.matched: str | None = None

    def __bool__(self) -> bool:
        return bool(self.stops)

    def feed(self, piece: str) -> bool:
        if not self.stops or self.matched is not None:
            return self.matched is not None
        window = self._tail + piece  # any stop that ends in this piece lies in the window
        for s in self.stops:
            if s in window:
                self.matched = s
                return True
        self._tail = window[len(window) - self._keep:] if self._keep else ""
        return False

    def cut(self, text: str) -> str:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[:min(found)] if found else text


def prime_state(model: LanguageModel, ids: numpy.ndarray):
    """The state of one stream after all but the last of ``ids`` (run as one chunk), a list
    of (h, c) per layer with shapes (H, 1); None (a zero state) for a single token. The last
    token is the first a Stepper is fed."""
    if len(ids) <= 1:
        return None
    _, _, state = model.forward(ids[:-1].reshape(-1, 1), None, None, store=False)
    return state


def warm_state(model: LanguageModel, ids: numpy.ndarray, N: int = 1) -> tuple:
    """A Stepper for ``N`` streams warmed on ``ids`` (all but the last run as one chunk), and
    the logits after feeding the last token."""
    stepper = model.stepper(N)
    state = prime_state(model, ids)
    if state is not None:
        if N > 1:
            xp = model.xp
            state = [(xp.repeat(h, N, axis=1), None if c is None else xp.repeat(c, N, axis=1)) for h, c in state]
        stepper.set_state(state)
    logits = stepper.step(numpy.repeat(ids[-1:], N))
    return stepper, logits


def draw(p: numpy.ndarray, rng: numpy.random.Generator) -> int:
    """One index drawn with probabilities ``p``: the same draw as ``rng.choice(len(p), p=p)``
    (the same uniform number, the same normalised cumulative sum), without its checks of p,
    which cost more than the draw (about 18 us against 6 per token)."""
    cdf = numpy.cumsum(p)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def sample_index(logits: numpy.ndarray, temperature: float, rng: numpy.random.Generator, ops=None) -> int:
    """draw(filter_probs(logits, temperature), rng) without top-k or top-p, by the faster
    route ``ops`` offers where it has one (the CPU engine: compiled scaling and drawing around
    NumPy's vectorised exp; the NumPy calls took about 100 us per token at V = 10,000, a
    fifth of a word model's sampling step)."""
    index = None if ops is None else ops.draw_scaled(logits, temperature, rng)
    if index is None:
        return draw(filter_probs(logits, temperature), rng)
    return index


def check_prime_memory(model: LanguageModel, ids, max_memory: int | None = None):
    """Refuse (memory.MemoryLimitError) a prime whose warm-up pass, one chunk of its length,
    would pass the memory available or ``max_memory``."""
    need = memory.inference(memory.Shape.of(model.config), len(ids), 1, numpy.dtype(model.dtype).itemsize,
                            who="warming the state on it needs")
    memory.check(need, f"--prime ({len(ids):,} tokens)", max_memory)


def choose(logits: numpy.ndarray, temperature: float, rng: numpy.random.Generator, top_k: int | None = None,
           top_p: float | None = None, ops=None) -> int:
    """The next token from host logits (V,): drawn with ``rng`` after temperature, top-k and
    top-p, or the argmax at temperature 0. The one choice of ``generate`` and the server."""
    if temperature > 0 and top_k is None and top_p is None:
        return sample_index(logits, temperature, rng, ops)
    p = filter_probs(logits, temperature, top_k, top_p)
    return draw(p, rng) if temperature > 0 else int(numpy.argmax(p))


class PieceText:
    """A generated token's text: the token at char level; at word level a newline for
    ``<eos>`` and the word detokenized against the text before it (no space at the start of a
    line or before punctuation). Call it with each token id in order."""

    def __init__(self, vocab: Vocab, prime: str = ""):
        self.vocab = vocab
        self.at_line_start = vocab.level == "word" and (not prime or prime.endswith("\n"))

    def __call__(self, tok: int) -> str:
        piece = self.vocab.tokens[tok]
        if self.vocab.level != "word":
            return piece
        if piece == EOS:
            self.at_line_start = True
            return "\n"
        from .io.vocab import detokenize

        text = detokenize([piece]) if self.at_line_start else detokenize(["x", piece])[1:]
        self.at_line_start = False
        return text


def generate(model: LanguageModel, vocab: Vocab, length: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, prime: str = "",
             rng: numpy.random.Generator | None = None, stop_at=None,
             max_memory: int | None = None) -> Iterator[str]:
    """Yield ``length`` generated tokens (as text pieces) after ``prime``, ending early after
    the piece that completes a stop string (``stop_at``: a string or a list of them; see
    StopRule).

    With no prime, the state starts at zero and the first input is a newline (char level) or
    ``<eos>`` (word level), i.e. the model starts as at the beginning of a line. A prime whose
    warm-up would pass the memory available (or ``max_memory`` bytes) is refused
    (memory.MemoryLimitError) before anything is generated.
    """
    rng = rng or numpy.random.default_rng()
    stop = StopRule(stop_at)
    ids = start_ids(vocab, prime)
    check_prime_memory(model, ids, max_memory)
    stepper, logits = warm_state(model, ids)
    piece_text = PieceText(vocab, prime)
    for _ in range(length):
        tok = choose(to_host(logits)[0], temperature, rng, top_k, top_p, model.ops)
        text = piece_text(tok)
        yield text
        if stop.feed(text):
            return
        logits = stepper.step(numpy.array([tok]))


# Beam search's repetition guard: no n-gram of this many tokens appears twice in a beam's text
# (prime included). Without it a character model's most likely continuation is a loop (the
# bundled model continued "ROMEO:" with 80 spaces); see beam_search.
NO_REPEAT = {"char": 8, "word": 3}


def check_beam_memory(model: LanguageModel, length: int, beam_size: int, prime_tokens: int, no_repeat: int,
                      max_memory: int | None = None):
    """Refuse (memory.MemoryLimitError) a beam search whose states, log-probabilities and beams
    (memory.beam) would pass the memory available or ``max_memory`` bytes, blaming --beam-size
    or --length, whichever lowers the estimate more."""
    shape, D = memory.Shape.of(model.config), numpy.dtype(model.dtype).itemsize

    def estimate(beam_size=beam_size, length=length):
        return memory.beam(shape, beam_size, length, prime_tokens, no_repeat, D).bytes

    subject = memory.culprit(estimate, {"--beam-size": ("beam_size", beam_size, 1), "--length": ("length", length, 1)},
                             f"--prime ({prime_tokens:,} tokens)")
    memory.check(memory.beam(shape, beam_size, length, prime_tokens, no_repeat, D), subject, max_memory)


def beam_search(model: LanguageModel, vocab: Vocab, length: int, beam_size: int, prime: str = "",
                no_repeat: int | None = None, max_memory: int | None = None):
    """The most likely continuation of ``length`` tokens found by beam search, among those in
    which no ``no_repeat``-gram of tokens occurs twice (default NO_REPEAT: 8 characters or 3
    words; 0 turns the guard off).

    Maximising probability alone favours loops: once a sequence repeats, a recurrent model
    grows more sure of the next repeat, so the likeliest text is a repetition (for the bundled
    model, a run of spaces). Blocking repeated n-grams (Paulus et al. 2017; fairseq's and
    Hugging Face's ``no_repeat_ngram_size``) removes these. Length normalisation is not needed:
    every beam has the same length. Eight characters is about a word and a half: words recur
    freely, phrases do not.

    A search that would pass the memory available (or ``max_memory`` bytes) is refused
    (memory.MemoryLimitError) before it starts.

    Returns (tokens as text, total log-probability in nats)."""
    n = NO_REPEAT[vocab.level] if no_repeat is None else no_repeat
    ids = start_ids(vocab, prime)
    check_beam_memory(model, length, beam_size, len(ids), n, max_memory)
    stepper, logits = warm_state(model, ids, beam_size)
    xp = model.xp
    history = [int(t) for t in ids] if prime else []
    # Each beam: (tokens, score, seen) with seen mapping an (n-1)-gram to the tokens that
    # followed it in the beam's text.
    beams = [([], 0.0, _ngrams(history, n))]
    logp = _log_softmax_host(to_host(logits)[:1])  # all rows are the same before the first choice
    for _ in range(length):
        if n:
            for r, (toks, _, seen) in enumerate(beams):
                text = history + toks
                if len(text) >= n - 1:
                    banned = seen.get(tuple(text[len(text) - (n - 1):]))
                    if banned:
                        logp[r, list(banned)] = -numpy.inf
        scores = numpy.array([b[1] for b in beams])[:, None] + logp  # (B, V)
        flat = numpy.argsort(-scores, axis=None, kind="stable")[:beam_size]
        flat = flat[numpy.isfinite(scores.reshape(-1)[flat])]
        if len(flat) == 0:
            break  # every continuation repeats an n-gram: stop here
        rows, toks = numpy.unravel_index(flat, scores.shape)
        beams = [_extend_beam(beams[r], int(t), float(scores[r, t]), history, n) for r, t in zip(rows, toks)]
        # Reorder the state so stream k continues beam k (unused streams repeat beam 0).
        pick = numpy.zeros(beam_size, dtype=numpy.int64)
        pick[: len(rows)] = rows
        pick_d = to_device(pick, xp)
        stepper.set_state([(h[:, pick_d], None if c is None else c[:, pick_d]) for h, c in stepper.state()])
        feed = numpy.array([b[0][-1] for b in beams] + [beams[0][0][-1]] * (beam_size - len(beams)))
        logits = stepper.step(feed)
        logp = _log_softmax_host(to_host(logits)[: len(beams)])
    tokens, score, _ = beams[0]
    return vocab.decode(tokens), score


def _ngrams(tokens: list, n: int) -> dict:
    """(n-1)-gram -> the set of tokens that followed it in ``tokens``."""
    seen: dict = {}
    if n:
        for i in range(len(tokens) - n + 1):
            seen.setdefault(tuple(tokens[i:i + n - 1]), set()).add(tokens[i + n - 1])
    return seen


def _extend_beam(beam, tok: int, score: float, history: list, n: int):
    toks, _, seen = beam
    toks = toks + [tok]
    if n:
        text = history + toks
        if len(text) >= n:
            key = tuple(text[len(text) - n:len(text) - 1])
            seen = dict(seen)
            seen[key] = seen.get(key, set()) | {tok}
    return toks, score, seen


def _log_softmax_host(logits: numpy.ndarray) -> numpy.ndarray:
    z = numpy.asarray(logits, dtype=numpy.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - numpy.log(numpy.exp(z).sum(axis=1, keepdims=True))

