"""Vocabularies: characters (Unicode code points) or words, to and from integer ids.

Character level: every code point seen in the corpus is a token (not bytes), ordered by code
point, so "é", "—" and emoji survive a round trip.

Word level: text is split into lines; each line becomes its tokens followed by ``<eos>``, so a
sentence's probability includes predicting its end (as in the RNN language-model tutorial and
Mikolov's RNNLM). Two tokenizers:

- ``regex`` (default): ``\\w+(?:['’]\\w+)*|[^\\w\\s]`` with Python's Unicode-aware ``\\w``:
  runs of letters/digits/underscore, with inner apostrophes kept ("don't", "l'homme"), and every
  other non-space character as a token of its own ("," "." "«").
- ``whitespace``: split on whitespace only, for corpora already tokenised one sentence per line
  (Penn Treebank: its ``<unk>``, ``N`` and ``'s`` stay tokens as they are).

Words are ordered by frequency (most frequent first, ties by the word) after ``<unk>`` and
``<eos>``; ``max_size`` and ``min_count`` cap the vocabulary, and the rest maps to ``<unk>``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import numpy

UNK = "<unk>"
EOS = "<eos>"
WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
TOKENIZERS = ("regex", "whitespace")
# Detokenising: no space before these, none after the opening ones.
_NO_SPACE_BEFORE = set(",.;:!?)]}%…”’»")
_NO_SPACE_AFTER = set("([{“‘«$")


class VocabError(ValueError):
    """A vocabulary cannot be built, or a text cannot be encoded with it."""


def tokenize_line(line: str, tokenizer: str) -> list[str]:
    if tokenizer == "regex":
        return WORD_RE.findall(line)
    if tokenizer == "whitespace":
        return line.split()
    raise VocabError(f"unknown tokenizer {tokenizer!r}: choose regex or whitespace")


def iter_lines(text: str):
    """Lines without their newline; a final line without a newline counts, an empty tail does not."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class Vocab:
    """A token list with its index. Build with :meth:`build_char` / :meth:`build_word`."""

    def __init__(self, level: str, tokens: list[str], tokenizer: str | None = None):
        if level not in ("char", "word"):
            raise VocabError(f"unknown level {level!r}: choose char or word")
        if len(set(tokens)) != len(tokens):
            raise VocabError("vocabulary has duplicate tokens")
        if level == "char" and any(len(t) != 1 for t in tokens):
            raise VocabError("a character vocabulary holds single characters only")
        if level == "word":
            if tokens[:2] != [UNK, EOS]:
                raise VocabError(f"a word vocabulary starts with {UNK} and {EOS}")
            if tokenizer not in TOKENIZERS:
                raise VocabError(f"unknown tokenizer {tokenizer!r}")
        self.level = level
        self.tokens = list(tokens)
        self.tokenizer = tokenizer if level == "word" else None
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if level == "char":
            self._codes = numpy.array([ord(t) for t in self.tokens], dtype=numpy.int64)
            self._order = numpy.argsort(self._codes)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int | None:
        return 0 if self.level == "word" else None

    @property
    def eos_id(self) -> int | None:
        return 1 if self.level == "word" else None

    @property
    def separator(self) -> str:
        """The token that ends a line: a newline at char level, ``<eos>`` at word level."""
        return "\n" if self.level == "char" else EOS

    @property
    def separator_id(self) -> int | None:
        """The separator's id; None for a char vocabulary that never saw a newline."""
        return self.index.get(self.separator)

    @property
    def start_id(self) -> int:
        """The context a text starts from, as at the start of a line: the separator, or token
        0 where the vocabulary has none (a corpus without newlines). Sampling without a
        prime, document scoring and dynamic evaluation all start here."""
        sep = self.separator_id
        return 0 if sep is None else sep

    # ----- building -----
    @classmethod
    def build_char(cls, chars: Iterable[str]) -> "Vocab":
        tokens = sorted(set(chars))
        if not tokens:
            raise VocabError("the corpus is empty")
        return cls("char", tokens)

    @classmethod
    def build_word(cls, counts: Counter, tokenizer: str = "regex", max_size: int | None = None,
                   min_count: int = 1) -> "Vocab":
        words = [(w, c) for w, c in counts.items() if w not in (UNK, EOS) and c >= min_count]
        words.sort(key=lambda wc: (-wc[1], wc[0]))
        if max_size is not None:
            if max_size < 3:
                raise VocabError("--vocab-size must be at least 3 (<unk>, <eos> and one word)")
            words = words[: max_size - 2]
        if not words:
            raise VocabError("the corpus has no words (after --min-count)")
        return cls("word", [UNK, EOS] + [w for w, _ in words], tokenizer=tokenizer)

    @staticmethod
    def count_words(text: str, tokenizer: str = "regex", counts: Counter | None = None) -> Counter:
        counts = Counter() if counts is None else counts
        for line in iter_lines(text):
            counts.update(tokenize_line(line, tokenizer))
            counts[EOS] += 1
        return counts

    # ----- encoding -----
    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` (word level: with ``<eos>`` after every line)."""
        if self.level == "char":
            return list(text)
        out = []
        for line in iter_lines(text):
            out.extend(tokenize_line(line, self.tokenizer))
            out.append(EOS)
        return out

    def encode(self, text: str) -> numpy.ndarray:
        """Token ids of ``text`` as int64. Characters not in a char vocabulary become -1 (see
        :meth:`unknown`); unknown words become ``<unk>``."""
        if self.level == "char":
            if not text:
                return numpy.zeros(0, dtype=numpy.int64)
            codes = numpy.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=numpy.uint32).astype(numpy.int64)
            sorted_codes = self._codes[self._order]
            pos = numpy.searchsorted(sorted_codes, codes)
            pos = numpy.minimum(pos, len(sorted_codes) - 1)
            ids = self._order[pos]
            ids[sorted_codes[pos] != codes] = -1
            return ids
        get = self.index.get
        return numpy.array([get(t, 0) for t in self.tokenize(text)], dtype=numpy.int64)

    def unknown(self, text: str) -> list[tuple[int, str]]:
        """(position, token) of every token of ``text`` outside the vocabulary (word level:
        words that will map to ``<unk>``; a literal ``<unk>`` in the text is known)."""
        return [(i, t) for i, t in enumerate(self.tokenize(text)) if t not in self.index]

    def decode(self, ids) -> str:
        n = len(self.tokens)
        toks = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise VocabError(f"token id {i} is outside the vocabulary (0..{n - 1})")
            toks.append(self.tokens[i])
        if self.level == "char":
            return "".join(toks)
        return detokenize(toks)

    # ----- serialisation -----
    def to_json(self) -> dict:
        d = {"level": self.level, "tokens": self.tokens}
        if self.level == "word":
            d["tokenizer"] = self.tokenizer
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise VocabError("vocabulary metadata is malformed")
        if not all(isinstance(t, str) for t in d["tokens"]):
            raise VocabError("vocabulary tokens must be strings")
        return cls(d.get("level"), d["tokens"], d.get("tokenizer"))

    def dtype(self):
        """The smallest unsigned integer dtype that holds every id."""
        n = len(self.tokens)
        return numpy.uint8 if n <= 256 else numpy.uint16 if n <= 65536 else numpy.uint32


def detokenize(tokens: list[str]) -> str:
    """Readable text from word tokens: ``<eos>`` ends a line, no space before closing
    punctuation or after opening punctuation, and none around an apostrophe suffix ("n't")."""
    out: list[str] = []
    at_line_start = True
    prev = ""
    for tok in tokens:
        if tok == EOS:
            out.append("\n")
            at_line_start = True
            continue
        glue = (at_line_start or tok in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER
                or tok.startswith("'") or tok == "n't")
        out.append(tok if glue else " " + tok)
        at_line_start = False
        prev = tok
    return "".join(out)
