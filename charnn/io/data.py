"""Reading corpora and cutting them into batches for truncated backpropagation through time.

Text is read as UTF-8 (or a given encoding) with clear errors for files that are missing,
binary or mis-encoded; a byte-order mark is dropped and Windows/old-Mac line endings become
"\\n". A token stream is cut into N contiguous streams, one per batch row, read T tokens at a
time, so the hidden state carried from one chunk to the next is the state of the same stream
(as in char-rnn and Chainer's PTB example):

    ids:      a0 a1 ... a(S-1) | b0 b1 ... b(S-1) | ...         (N streams of S tokens)
    chunk k:  x = streams[:, kT : kT+T].T      y = streams[:, kT+1 : kT+T+1].T     (T, N)
"""

from __future__ import annotations

import numpy

from .corpus import CorpusError, iter_text  # noqa: F401  (CorpusError re-exported for callers)
from ..wording import plural


def read_text(path, encoding: str = "utf-8", errors: str = "strict", pipes: bool = False) -> str:
    """Read a text file ("-" for stdin), normalising line endings to "\\n" and dropping a
    byte-order mark (the whole text at once; corpus.iter_text streams it). ``pipes``: also
    read a FIFO or device once, as a stream (score's FILE, e.g. ``<(cat lines.txt)``).

    Raises:
        CorpusError: missing path, a directory, a FIFO or device (unless ``pipes``), a binary
            file (NUL bytes), undecodable bytes (with the byte offset and line), or an unknown
            encoding.
    """
    return "".join(iter_text(path, encoding, errors, pipes=pipes))


def split_tail(ids: numpy.ndarray, fraction: float):
    """(train, val): the last ``fraction`` of the tokens is validation (nanoGPT's split)."""
    n_val = int(round(len(ids) * fraction))
    if fraction > 0 and n_val < 2:
        raise CorpusError(f"the corpus ({plural(len(ids), 'token')}) is too short to hold out {fraction:g} for validation")
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


class Batches:
    """Contiguous streams over a token array, for truncated BPTT.

    Args:
        ids: (L,) integer token ids (any unsigned dtype; kept as given, e.g. a memory map).
        batch_size: N streams.
        seq_len: T steps per chunk.
        drop_last: skip the final partial chunk (training); evaluation keeps it.
        part: (a, b): chunks hold streams a to b - 1 only (one rank's share of the batch in
            data-parallel training; ``streams`` stays all N, a view, never a copy).
    """

    def __init__(self, ids, batch_size: int, seq_len: int, drop_last: bool = True, part=None):
        L = len(ids)
        self.N, self.T = batch_size, seq_len
        self.S = L // batch_size  # tokens per stream
        if self.S < 2 or (drop_last and self.S - 1 < seq_len):
            raise CorpusError(f"{plural(L, 'token')} {'is' if L == 1 else 'are'} too few for --batch-size {batch_size} x --seq-len {seq_len} "
                              f"(need at least {batch_size * (seq_len + 1)}); use smaller values or more text")
        self.streams = numpy.asarray(ids[: batch_size * self.S]).reshape(batch_size, self.S)
        self.part = (0, batch_size) if part is None else tuple(part)
        steps = self.S - 1
        self.n_chunks = steps // seq_len if drop_last else -(-steps // seq_len)

    def __len__(self) -> int:
        return self.n_chunks

    @property
    def tokens_per_epoch(self) -> int:
        return self.n_chunks * self.N * self.T

    def chunk(self, k: int):
        """(x, y) for chunk k, each (T', b - a) int64 for the streams a to b - 1 of ``part``
        (T' = T except a final partial chunk)."""
        a = k * self.T
        b = min(a + self.T, self.S - 1)
        own = self.streams[self.part[0]:self.part[1]]
        x = own[:, a:b].T.astype(numpy.int64)
        y = own[:, a + 1: b + 1].T.astype(numpy.int64)
        return x, y


class EvalStreams:
    """Streams for evaluation in which every token after the first is predicted exactly once.

    The L tokens are cut into N streams of S + 1 tokens, overlapping by one (stream n is
    ids[nS : nS + S + 1]), so each stream's first token is the context of its first prediction;
    the last stream is padded and its padding masked out. N is at most ``batch_size`` and at
    most the number of predictions.
    """

    def __init__(self, ids, batch_size: int, seq_len: int):
        L = len(ids)
        P = L - 1  # predictions
        if P < 1:
            raise CorpusError("need at least two tokens to evaluate")
        self.N = N = max(1, min(batch_size, P))
        self.T = seq_len
        self.S = S = -(-P // N)
        self.ids = ids  # indexed chunk by chunk, never copied whole (it may be a memory map)
        self.n_chunks = -(-S // seq_len)
        self.predictions = P

    def __len__(self) -> int:
        return self.n_chunks

    def chunk(self, k: int):
        """(x, y, w) for chunk k, each (T', N); w is 1 where the target is real, else 0."""
        a = k * self.T
        b = min(a + self.T, self.S)
        pos = numpy.arange(a, b + 1)[:, None] + numpy.arange(self.N)[None, :] * self.S  # (T' + 1, N)
        P = self.predictions
        tokens = numpy.asarray(self.ids[numpy.minimum(pos, P).reshape(-1)]).reshape(pos.shape).astype(numpy.int64)
        w = (pos[1:] <= P).astype(numpy.float64)
        return tokens[:-1].copy(), tokens[1:].copy(), w
