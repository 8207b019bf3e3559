"""The run's text: the vocabulary, the corpus encoded once into a token cache, the validation
split, and the evaluation of a model on held-out ids."""

from __future__ import annotations

import numpy

from ..dist import World
from ..io.data import CorpusError, EvalStreams, read_text, split_tail
from ..io.fileio import file_kind, sha256_file
from ..io.vocab import Vocab, VocabError
from ..backend import to_device, to_float
from ..nn.model import LanguageModel
from ..score import stream_losses
from .config import TrainConfig


def file_digest(path) -> str:
    """The SHA-256 of a regular file (a FIFO or device is refused: opening one may wait forever,
    and it could not be read again for training)."""
    kind = file_kind(path)
    if kind:
        raise CorpusError(f"{path}: is {kind}, not a regular file")
    return sha256_file(path)


def prepare_data(cfg: TrainConfig, vocab: Vocab | None = None, cache_dir=None, digest: str | None = None):
    """Build or reuse the vocabulary and encode the corpus (and validation file).

    The corpus is streamed (corpus.py): a vocabulary pass, then an encoding pass into a token
    cache in ``cache_dir`` (the run folder), memory-mapped, so a corpus of several GB never sits
    in memory as text. Without ``cache_dir`` the ids are encoded in memory.

    Returns (vocab, train_ids, val_ids) with ids as compact unsigned arrays.
    """
    from ..io import corpus

    val_text = read_text(cfg.val, cfg.encoding, cfg.errors) if cfg.val else None
    if cfg.val and not val_text:
        raise CorpusError(f"{cfg.val}: the validation file is empty")
    if vocab is None:
        try:
            vocab = _build_vocab(cfg, val_text)
        except VocabError as e:
            raise CorpusError(f"{cfg.corpus}: {e}") from None
    if len(vocab) < 2:
        raise CorpusError(f"{cfg.corpus}: the corpus has a single distinct token; a language model needs at least two")
    try:
        if cache_dir is not None:
            ids = corpus.cached_ids(cfg.corpus, vocab, cache_dir, digest or file_digest(cfg.corpus), cfg.encoding, cfg.errors)
        else:
            ids = corpus.encode_ids(cfg.corpus, vocab, cfg.encoding, cfg.errors)
    except CorpusError as e:
        if "not in the vocabulary" in str(e):
            raise CorpusError(f"{cfg.corpus}: holds characters outside the model's vocabulary") from None
        raise
    if len(ids) == 0:
        raise CorpusError(f"{cfg.corpus}: the corpus is empty")
    dtype = vocab.dtype()
    if val_text is not None:
        val_ids = vocab.encode(val_text)
        if (val_ids < 0).any():
            raise CorpusError(f"{cfg.val}: holds characters outside the model's vocabulary")
        if len(val_ids) < 2:
            raise CorpusError(f"{cfg.val}: the validation text needs at least two tokens")
        return vocab, ids, val_ids.astype(dtype)
    if cfg.val_fraction > 0:
        try:
            train_ids, val_ids = split_tail(ids, cfg.val_fraction)
        except CorpusError as e:
            raise CorpusError(f"{cfg.corpus}: {e}") from None
        return vocab, train_ids, val_ids
    return vocab, ids, None


def _build_vocab(cfg: TrainConfig, val_text: str | None) -> Vocab:
    from ..io import corpus

    if cfg.level == "char":
        chars = set(val_text or "")
        for piece in corpus.iter_text(cfg.corpus, cfg.encoding, cfg.errors):
            chars.update(piece)
        return Vocab.build_char(chars)
    limit = None
    if cfg.val is None and cfg.val_fraction > 0:
        # Count words of the training part only, so held-out words can be unknown.
        _, n = corpus.count_words(cfg.corpus, cfg.tokenizer, None, cfg.encoding, cfg.errors)
        limit = n - int(round(n * cfg.val_fraction))
    counts, _ = corpus.count_words(cfg.corpus, cfg.tokenizer, limit, cfg.encoding, cfg.errors)
    return Vocab.build_word(counts, cfg.tokenizer, cfg.vocab_size, cfg.min_count)


def evaluate(model: LanguageModel, ids, batch_size: int, seq_len: int, world: World | None = None) -> float:
    """Mean nats per token over ``ids`` (every token after the first predicted once), with the
    state carried across chunks and no dropout; see data.EvalStreams for the layout.

    ``world``: data-parallel ranks, each of which evaluates its share of the streams (a
    collective: every rank calls it); their sums are added, so the result is the same on every
    rank and equals one process's up to the order of summation."""
    streams = EvalStreams(ids, batch_size, seq_len)
    a, b = 0, streams.N
    if world is not None and world.size > 1:
        cuts = numpy.linspace(0, streams.N, world.size + 1).round().astype(int)
        a, b = int(cuts[world.rank]), int(cuts[world.rank + 1])
    total = model.xp.zeros((), dtype=numpy.float64)
    if b > a:
        for _, nll, w in stream_losses(model, streams, None if (a, b) == (0, streams.N) else (a, b)):
            total += (nll.astype(numpy.float64) * to_device(w, model.xp)).sum()
    total = to_float(total)
    if world is not None and world.size > 1:
        total = world.sum(total)
    return total / streams.predictions
