"""Streaming corpora: build a vocabulary and encode a text file of any size without holding it.

The file is read in blocks of bytes and decoded incrementally (so an error names its exact byte
offset), with a byte-order mark dropped and "\\r\\n" / "\\r" turned into "\\n" even across block
boundaries. Encoding writes the token ids to a cache file of the smallest unsigned type that
holds the vocabulary (uint8, uint16 or uint32) and maps it back with numpy.memmap, so training
on a corpus of several GB keeps only the token array (on disk, paged in as needed) and one block
of text in memory.

A cache file ends with a trailer: ``CACHE_MAGIC``, the token count (uint64, little-endian) and
the SHA-256 of the id bytes before it. A cache found in a run folder is used only if its size and
hash agree with its trailer; otherwise it is rebuilt from the corpus when the corpus is the one it
was made from (same digest), and refused when it is not, so a truncated or altered cache never
trains (or validates) on other tokens.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy

from .fileio import atomic_open, file_kind, sha256_file
from .vocab import EOS, Vocab, tokenize_line



class CorpusError(ValueError):
    """A corpus cannot be read or is unusable; the message names the path and the problem."""


BLOCK = 1 << 22  # 4 MiB of bytes per block (encoding one holds a few times that)
CACHE_MAGIC = b"CHARNNT1"
TRAILER = len(CACHE_MAGIC) + 8 + 32


def iter_text(path, encoding: str = "utf-8", errors: str = "strict", block: int = BLOCK,
              pipes: bool = False) -> Iterator[str]:
    """Decoded text of ``path`` in pieces, with newlines normalised and a BOM dropped.

    Args:
        pipes: read a FIFO or device too (once, as a stream); otherwise only regular files and
            "-" (stdin), so a named pipe without a writer cannot make the caller wait forever.

    Raises:
        CorpusError: missing file, directory, FIFO or device, NUL bytes (binary), undecodable
            bytes (with the byte offset), unknown or non-text encoding.
    """
    p = Path(path)
    stdin = str(path) == "-"
    if stdin:
        p = "<stdin>"
    else:
        _check_readable(p, pipes)
    decoder = _decoder(encoding, errors)
    wide = codecs.lookup(encoding).name.replace("-", "").startswith(("utf16", "utf32"))
    offset = 0
    lines = 0  # newlines in the blocks before this one
    first = True
    pending_cr = False
    fifo = not stdin and file_kind(p) == "a FIFO (named pipe)"
    try:
        f = contextlib.nullcontext(sys.stdin.buffer) if stdin else _open_stream(p) if fifo else open(p, "rb")
    except OSError as e:
        raise CorpusError(f"{p}: cannot read: {e.strerror or e}") from None
    # A buffered read returns short only at the end of input. On a terminal each Ctrl-D ends
    # one read, so reading again after a short read would wait for a second Ctrl-D.
    tty = stdin and sys.stdin.isatty()
    ended = False
    with f as f:
        while True:
            data = b"" if ended else f.read(block)
            ended = tty and len(data) < block
            final = not data
            if final and fifo and offset == 0:
                raise CorpusError(f"{p}: nothing to read (a FIFO without a writer, or an empty pipe)")
            if not wide and data:
                nul = data.find(b"\x00")
                if nul >= 0:
                    raise CorpusError(f"{p}: looks like a binary file (NUL byte at offset {offset + nul}), not text")
            held = decoder.getstate()[0]  # bytes of an unfinished character from the last block
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as e:
                # e.start counts from the held bytes, which precede this block.
                line = lines + (bytes(held) + data).count(b"\n", 0, e.start) + 1
                raise CorpusError(f"{p}: not valid {encoding} at byte {offset - len(held) + e.start} (line {line}); "
                                  f"pass --encoding (e.g. latin-1) or --errors replace") from None
            except UnicodeError as e:  # a codec that cannot decode at all ("undefined")
                raise CorpusError(f"{p}: cannot decode with {encoding!r}: {e}") from None
            offset += len(data)
            lines += data.count(b"\n")
            if first and text:
                text = text.lstrip("\ufeff") if text.startswith("\ufeff") else text
                first = False
            if pending_cr:
                text = "\r" + text
                pending_cr = False
            if text.endswith("\r") and not final:
                text, pending_cr = text[:-1], True
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if final:
                break


def _check_readable(p: Path, pipes: bool = False):
    """Refuse (CorpusError) a path that is missing, a folder, or (unless ``pipes``) a FIFO or
    device, which could make a reader wait forever."""
    if not p.exists():
        raise CorpusError(f"{p}: no such file")
    if p.is_dir():
        raise CorpusError(f"{p}: is a directory, not a text file")
    if not pipes and file_kind(p):
        raise CorpusError(f"{p}: is {file_kind(p)}, not a regular file")


def _decoder(encoding: str, errors: str):
    """An incremental decoder of a text encoding (CorpusError for an unknown or non-text one)."""
    try:
        if not getattr(codecs.lookup(encoding), "_is_text_encoding", True):
            raise CorpusError(f"{encoding!r} is not a text encoding")
        return codecs.getincrementaldecoder(encoding)(errors)
    except (LookupError, TypeError):
        raise CorpusError(f"unknown encoding {encoding!r}") from None


def _open_stream(p):
    """A FIFO opened without waiting for a writer (a plain open() waits until one comes, maybe
    never); reads then block as usual while a writer is there, and find the end when none is."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return open(fd, "rb")


def build_vocab(path, level: str = "char", tokenizer: str = "regex", max_size=None, min_count: int = 1,
                encoding: str = "utf-8", errors: str = "strict") -> Vocab:
    """One streaming pass over ``path``: every character, or word counts, then the vocabulary."""
    if level == "char":
        chars: set = set()
        for piece in iter_text(path, encoding, errors):
            chars.update(piece)
        return Vocab.build_char(chars)
    counts: Counter = Counter()
    for line in iter_lines(path, encoding, errors):
        counts.update(tokenize_line(line, tokenizer))
        counts[EOS] += 1
    return Vocab.build_word(counts, tokenizer, max_size, min_count)


def iter_lines(path, encoding="utf-8", errors="strict") -> Iterator[str]:
    """Lines without their newline, streamed (a final line without a newline counts)."""
    rest = ""
    for piece in iter_text(path, encoding, errors):
        piece = rest + piece
        lines = piece.split("\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def encode_to_file(path, vocab: Vocab, out_path, encoding="utf-8", errors="strict") -> int:
    """Encode ``path`` with ``vocab`` into the raw id file ``out_path`` (written to a temporary
    name and renamed), followed by the trailer (see the module docstring). Returns the number
    of tokens.

    Raises:
        CorpusError: a character outside a char vocabulary (with its position).
    """
    dtype = vocab.dtype()
    n = 0
    with atomic_open(out_path) as f:
        out = _Hashed(f)
        if vocab.level == "char":
            for piece in iter_text(path, encoding, errors):
                ids = vocab.encode(piece)
                if (ids < 0).any():
                    first = int(numpy.argmax(ids < 0))
                    raise CorpusError(f"{path}: character {piece[first]!r} (near token {n + first}) is not in the vocabulary")
                out.write(ids.astype(dtype).tobytes())
                n += len(ids)
        else:
            buf = []
            for line in iter_lines(path, encoding, errors):
                buf.extend(vocab.index.get(t, 0) for t in tokenize_line(line, vocab.tokenizer))
                buf.append(vocab.eos_id)
                if len(buf) >= 1 << 20:
                    out.write(numpy.asarray(buf, dtype=dtype).tobytes())
                    n += len(buf)
                    buf = []
            out.write(numpy.asarray(buf, dtype=dtype).tobytes())
            n += len(buf)
        f.write(CACHE_MAGIC + n.to_bytes(8, "little") + out.hash.digest())
    return n


class _Hashed:
    """Writes through to ``f`` and hashes what it writes."""

    def __init__(self, f):
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data: bytes):
        self.hash.update(data)
        self.f.write(data)


def cache_count(cache: Path, dtype) -> int | None:
    """The token count of a cache file whose size and hash agree with its trailer, else None."""
    try:
        with open(cache, "rb") as f:
            size = f.seek(0, 2)
            if size < TRAILER:
                return None
            f.seek(size - TRAILER)
            trailer = f.read(TRAILER)
            n = int.from_bytes(trailer[len(CACHE_MAGIC): len(CACHE_MAGIC) + 8], "little")
            if trailer[: len(CACHE_MAGIC)] != CACHE_MAGIC or n * numpy.dtype(dtype).itemsize != size - TRAILER:
                return None
            f.seek(0)
            h, left = hashlib.sha256(), size - TRAILER
            while left:
                block = f.read(min(BLOCK, left))
                if not block:
                    return None
                h.update(block)
                left -= len(block)
    except OSError:
        return None
    return n if h.digest() == trailer[-32:] else None


def vocab_key(vocab: Vocab) -> str:
    import json

    return hashlib.sha256(json.dumps(vocab.to_json(), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def count_words(path, tokenizer: str, limit: int | None = None, encoding="utf-8", errors="strict"):
    """(counts, tokens): word counts of the first ``limit`` tokens (all if None), streamed;
    every line ends with <eos>."""
    counts: Counter = Counter()
    n = 0
    for line in iter_lines(path, encoding, errors):
        toks = tokenize_line(line, tokenizer) + [EOS]
        if limit is not None and n + len(toks) > limit:
            toks = toks[: max(0, limit - n)]
        counts.update(toks)
        n += len(toks)
        if limit is not None and n >= limit:
            break
    return counts, n


def cached_ids(path, vocab: Vocab, cache_dir, corpus_digest: str, encoding="utf-8", errors="strict") -> numpy.ndarray:
    """The token ids of ``path`` as a read-only memory map, encoded once into ``cache_dir``
    (named by the corpus digest, vocabulary and dtype, so a changed corpus or vocabulary never
    reuses a stale cache).

    Raises:
        CorpusError: the cache is damaged (truncated, altered, or written by an older charnn)
            and the corpus it was made from is not there to rebuild it.
    """
    dtype = numpy.dtype(vocab.dtype())
    cache = Path(cache_dir) / f"tokens-{corpus_digest[:16]}-{vocab_key(vocab)}.{dtype.name}"
    n = cache_count(cache, dtype) if cache.exists() else None
    if n is None:
        if cache.exists() and not _has_digest(path, corpus_digest):
            raise CorpusError(f"{cache}: the token cache is damaged (truncated or altered) and the corpus it was made "
                              f"from ({path}) is missing or changed, so it cannot be rebuilt; cannot resume exactly")
        n = encode_to_file(path, vocab, cache, encoding, errors)
    if n == 0:
        return numpy.zeros(0, dtype=dtype)
    return numpy.memmap(cache, dtype=dtype, mode="r", shape=(n,))


def _has_digest(path, digest: str) -> bool:
    try:
        return sha256_file(path) == digest
    except OSError:
        return False


def encode_ids(path, vocab: Vocab, encoding="utf-8", errors="strict") -> numpy.ndarray:
    """The token ids of ``path`` in memory (compact dtype), encoded block by block."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        n = encode_to_file(path, vocab, Path(tmp) / "ids", encoding, errors)
        return numpy.fromfile(Path(tmp) / "ids", dtype=vocab.dtype(), count=n)


# ----- reading only the part of a text that is used -----
#
# Dynamic evaluation measures its statistics on the last few thousand tokens of a training-side
# text (dynamic.py): those are read, not the whole file. From the end where the encoding lets a
# reader start anywhere (UTF-8, whose continuation bytes mark where a character starts, and
# single-byte encodings), streamed otherwise; either way the memory held is what is used plus
# one block.

TAIL_START = 1 << 16  # bytes first read from the end; then four times as many, up to TAIL_MAX
TAIL_MAX = 1 << 26


def iter_ids(path, vocab: Vocab, encoding: str = "utf-8", errors: str = "strict") -> Iterator[numpy.ndarray]:
    """The token ids of ``path`` (int64) block by block, streamed: every character at char
    level (-1 for one outside the vocabulary), each line's words then <eos> at word level
    (<unk> for an unknown word)."""
    if vocab.level == "char":
        for piece in iter_text(path, encoding, errors):
            yield vocab.encode(piece)
        return
    buf: list = []
    get = vocab.index.get
    for line in iter_lines(path, encoding, errors):
        buf.extend(get(t, 0) for t in tokenize_line(line, vocab.tokenizer))
        buf.append(vocab.eos_id)
        if len(buf) >= 1 << 16:
            yield numpy.asarray(buf, dtype=numpy.int64)
            buf = []
    if buf:
        yield numpy.asarray(buf, dtype=numpy.int64)


def _known(path, ids, strict: bool, at: int = 0):
    """``ids`` without the -1 of characters outside a char vocabulary, or with ``strict`` a
    CorpusError naming the first (``at``: the token position of ids[0])."""
    bad = ids < 0
    if not bad.any():
        return ids
    if strict:
        raise CorpusError(f"{path}: holds a character outside the model's vocabulary (near token "
                          f"{at + int(numpy.argmax(bad)):,})")
    return ids[~bad]


def count_tokens(path, vocab: Vocab, encoding: str = "utf-8", errors: str = "strict", strict: bool = True) -> int:
    """The number of tokens of ``path`` (streamed; ``strict``: a character outside a char
    vocabulary is an error, else it is not counted)."""
    n = 0
    for ids in iter_ids(path, vocab, encoding, errors):
        n += len(_known(path, ids, strict, n))
    return n


def window_ids(path, vocab: Vocab, start: int, stop: int, encoding: str = "utf-8", errors: str = "strict",
               strict: bool = True) -> numpy.ndarray:
    """Tokens ``start`` to ``stop`` - 1 of ``path`` (int64), streamed, holding only those."""
    out, n = [], 0
    for ids in iter_ids(path, vocab, encoding, errors):
        ids = _known(path, ids, strict, n)
        a, b = max(start - n, 0), min(stop - n, len(ids))
        if a < b:
            out.append(ids[a:b])
        n += len(ids)
        if n >= stop:
            break
    return numpy.concatenate(out) if out else numpy.zeros(0, dtype=numpy.int64)


def tail_ids(path, vocab: Vocab, count: int, encoding: str = "utf-8", errors: str = "strict",
             strict: bool = False) -> numpy.ndarray:
    """The last ``count`` tokens of ``path`` (int64; all of them when it holds fewer), characters
    outside a char vocabulary left out (an error with ``strict``). Read from the end where the
    encoding allows it (see above), so a text of any size costs about what is used.

    Raises:
        CorpusError: as iter_text (missing, a folder, a FIFO, binary, not decodable).
    """
    p = Path(path)
    _check_readable(p)
    _decoder(encoding, errors)
    if _seekable(encoding):
        size = p.stat().st_size
        chunk = max(TAIL_START, 8 * count)  # (8 bytes a token: most texts need one read)
        while True:
            length = min(chunk, size)
            ids = _tail_block(p, vocab, size, length, encoding, errors, strict)
            if ids is not None and (len(ids) >= count or length == size):
                return ids[len(ids) - min(count, len(ids)):]
            if length == size or chunk >= TAIL_MAX:
                break  # mostly characters outside the vocabulary, or lines this long: stream it
            chunk *= 4
    # Streamed: one block at a time, the last ``count`` tokens kept.
    kept = numpy.zeros(0, dtype=numpy.int64)
    n = 0
    for ids in iter_ids(p, vocab, encoding, errors):
        ids = _known(p, ids, strict, n)
        n += len(ids)
        kept = numpy.concatenate([kept, ids])[-count:] if count else kept
    return kept


def _seekable(encoding: str) -> bool:
    """Whether a reader can start at any byte of a text in ``encoding`` and find where the
    next character starts: UTF-8, or an encoding of one byte per character."""
    name = codecs.lookup(encoding).name
    if name in ("utf-8", "utf-8-sig"):
        return True
    decoder = codecs.getincrementaldecoder(encoding)("replace")
    try:
        return all(len(decoder.decode(bytes([b]))) == 1 for b in range(256))
    except (UnicodeError, ValueError):
        return False


def _tail_block(p: Path, vocab: Vocab, size: int, length: int, encoding: str, errors: str, strict: bool):
    """The tokens of the last ``length`` bytes of ``p`` from the first place a token can start
    there (a character's first byte; at word level, after the first newline), or None when
    no such place is in them."""
    start = size - length
    with open(p, "rb") as f:
        f.seek(start)
        data = f.read(length)
    utf8 = codecs.lookup(encoding).name.startswith("utf-8")
    skip = 0
    if start > 0:
        if vocab.level == "word":
            skip = data.find(b"\n") + 1
            if skip == 0:
                return None
        elif utf8:
            while skip < len(data) and 0x80 <= data[skip] < 0xC0:  # continuation bytes
                skip += 1
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{p}: looks like a binary file (NUL byte at offset {start + nul}), not text")
    try:  # (utf-8-sig past the start is plain UTF-8: a U+FEFF there is a character)
        text = data[skip:].decode("utf-8" if utf8 and start > 0 else encoding, errors)
    except UnicodeDecodeError as e:
        raise CorpusError(f"{p}: not valid {encoding} at byte {start + skip + e.start}; pass --encoding "
                          f"(e.g. latin-1) or --errors replace") from None
    if start == 0:
        text = text.lstrip("\ufeff") if text.startswith("\ufeff") else text
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _known(p, vocab.encode(text), strict)


def same_text(path, text: str, encoding: str = "utf-8", errors: str = "strict") -> bool:
    """Whether ``path`` holds ``text`` (newlines and a byte-order mark as iter_text reads them),
    read only as far as the first difference."""
    at = 0
    for piece in iter_text(path, encoding, errors):
        if text[at:at + len(piece)] != piece:
            return False
        at += len(piece)
    return at == len(text)
