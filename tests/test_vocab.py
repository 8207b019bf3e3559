"""Character and word vocabularies: encode/decode, tokenizers, <unk>/<eos>, JSON."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charnn.io.vocab import EOS, UNK, Vocab, VocabError, detokenize, iter_lines, tokenize_line

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"

# Any code point but surrogates (not valid in UTF-8 text), with emoji, combining marks and CJK
# drawn often enough to matter.
SPECIAL = "é\u0301\u0308🙂👍🏽\u200d❤️漢字かなー한국\n\t \u00a0—«»’\U0001F9EA\U00010000\U0010FFFF"
chars = st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(SPECIAL))
texts = st.text(alphabet=chars, max_size=60)


# ----- character level -----

@settings(max_examples=150, deadline=None, derandomize=True)
@given(texts)
def test_char_round_trip_any_unicode(text):
    if not text:
        return
    vocab = Vocab.build_char(text)
    ids = vocab.encode(text)
    assert ids.dtype == numpy.int64 and len(ids) == len(text)
    assert (ids >= 0).all() and (ids < len(vocab)).all()
    assert vocab.decode(ids) == text
    assert vocab.unknown(text) == []
    assert vocab.tokens == sorted(set(text))  # code point order
    again = Vocab.from_json(json.loads(json.dumps(vocab.to_json())))
    numpy.testing.assert_array_equal(again.encode(text), ids)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(texts, texts)
def test_char_unknown_encode_to_minus_one(known, text):
    if not known:
        return
    vocab = Vocab.build_char(known)
    ids = vocab.encode(text)
    expected_unknown = [(i, ch) for i, ch in enumerate(text) if ch not in set(known)]
    assert vocab.unknown(text) == expected_unknown
    assert [i for i, v in enumerate(ids) if v == -1] == [i for i, _ in expected_unknown]
    for i, ch in enumerate(text):
        if ch in vocab.index:
            assert ids[i] == vocab.index[ch]


def test_char_examples():
    vocab = Vocab.build_char("héllo 🙂")
    assert vocab.decode(vocab.encode("🙂 hé")) == "🙂 hé"
    numpy.testing.assert_array_equal(vocab.encode("xé"), [-1, vocab.index["é"]])
    assert vocab.unknown("xé!") == [(0, "x"), (2, "!")]
    assert vocab.encode("").shape == (0,)
    assert vocab.unk_id is None and vocab.eos_id is None
    # combining marks are code points of their own, not merged into graphemes
    v2 = Vocab.build_char("e\u0301")
    assert len(v2) == 2 and v2.decode(v2.encode("e\u0301")) == "e\u0301"
    with pytest.raises(VocabError):
        Vocab.build_char("")


def test_char_decode_refuses_the_unknown_id():
    vocab = Vocab.build_char("abc")
    with pytest.raises((VocabError, IndexError, ValueError)):
        vocab.decode(vocab.encode("x"))


# ----- word level -----

def test_regex_tokenizer():
    assert tokenize_line("Don't stop, he said.", "regex") == ["Don't", "stop", ",", "he", "said", "."]
    assert tokenize_line("l’homme «vite»", "regex") == ["l’homme", "«", "vite", "»"]
    assert tokenize_line("  ", "regex") == []
    vocab = Vocab.build_word(Vocab.count_words("Don't stop, he said.\n"), "regex")
    assert vocab.tokenize("Don't stop, he said.") == ["Don't", "stop", ",", "he", "said", ".", EOS]


def test_whitespace_tokenizer_on_a_ptb_line():
    line = " no it was n't black monday "
    assert tokenize_line(line, "whitespace") == ["no", "it", "was", "n't", "black", "monday"]
    text = line + "\n but while the <unk> N stock exchange did n't fall \n"
    vocab = Vocab.build_word(Vocab.count_words(text, "whitespace"), "whitespace")
    toks = vocab.tokenize(text)
    assert toks == ["no", "it", "was", "n't", "black", "monday", EOS,
                    "but", "while", "the", "<unk>", "N", "stock", "exchange", "did", "n't", "fall", EOS]
    ids = vocab.encode(text)
    assert ids[toks.index("<unk>")] == vocab.unk_id == 0  # PTB's literal <unk> is the <unk> token
    assert vocab.unknown(text) == []
    with pytest.raises(VocabError):
        tokenize_line("x", "bpe")


def test_eos_after_every_line():
    assert iter_lines("a\nb\n") == ["a", "b"]
    assert iter_lines("a\nb") == ["a", "b"]
    assert iter_lines("a\n\nb\n") == ["a", "", "b"]
    counts = Vocab.count_words("a b\n\nc\n")
    assert counts[EOS] == 3
    vocab = Vocab.build_word(counts)
    assert vocab.tokenize("a b\n\nc\n") == ["a", "b", EOS, EOS, "c", EOS]
    assert vocab.tokenize("a b") == ["a", "b", EOS]  # a final line without newline still ends
    assert vocab.tokenize("") == []


def test_frequency_order_and_unk():
    text = "b b b a a c c d\ne e e e\n"
    counts = Vocab.count_words(text)
    vocab = Vocab.build_word(counts)
    # <unk>, <eos>, then by count descending, ties by the word
    assert vocab.tokens == [UNK, EOS, "e", "b", "a", "c", "d"]
    assert (vocab.unk_id, vocab.eos_id) == (0, 1)
    capped = Vocab.build_word(counts, max_size=4)
    assert capped.tokens == [UNK, EOS, "e", "b"]
    numpy.testing.assert_array_equal(capped.encode("a e zz\n"), [0, 2, 0, 1])
    assert capped.unknown("a e zz\n") == [(0, "a"), (2, "zz")]
    assert capped.unknown("e b") == []
    rare = Vocab.build_word(counts, min_count=2)
    assert rare.tokens == [UNK, EOS, "e", "b", "a", "c"]
    assert "d" not in rare.index and rare.encode("d")[0] == 0
    with pytest.raises(VocabError):
        Vocab.build_word(counts, max_size=2)
    with pytest.raises(VocabError):
        Vocab.build_word(counts, min_count=100)
    with pytest.raises(VocabError):
        Vocab.build_word(Counter())


def test_word_json_round_trip():
    text = "the cat sat\non the mat .\n"
    vocab = Vocab.build_word(Vocab.count_words(text, "whitespace"), "whitespace", max_size=5)
    d = json.loads(json.dumps(vocab.to_json()))
    assert d == {"level": "word", "tokens": vocab.tokens, "tokenizer": "whitespace"}
    again = Vocab.from_json(d)
    assert again.tokens == vocab.tokens and again.tokenizer == "whitespace" and again.level == "word"
    numpy.testing.assert_array_equal(again.encode(text), vocab.encode(text))
    char = Vocab.build_char("xyz")
    assert Vocab.from_json(char.to_json()).tokens == ["x", "y", "z"]
    assert "tokenizer" not in char.to_json()


@pytest.mark.parametrize("bad", [
    None, [], "tokens", {}, {"level": "char"}, {"level": "char", "tokens": "abc"},
    {"level": "char", "tokens": ["a", 1]}, {"level": "char", "tokens": ["ab"]},
    {"level": "char", "tokens": ["a", "a"]}, {"level": "bytes", "tokens": ["a"]},
    {"tokens": ["a"]}, {"level": "word", "tokens": ["a", "b"], "tokenizer": "regex"},
    {"level": "word", "tokens": [UNK, EOS, "x"]}, {"level": "word", "tokens": [UNK, EOS, "x"], "tokenizer": "bpe"},
    {"level": "word", "tokens": [UNK, EOS, "x", "x"], "tokenizer": "regex"},
])
def test_malformed_json_raises_vocab_error(bad):
    with pytest.raises(VocabError):
        Vocab.from_json(bad)


def test_detokenize():
    assert detokenize("hello , world .".split()) == "hello, world."
    assert detokenize(["he", "did", "n't", "go", "(", "really", ")", "!", EOS, "it", "'s", "fine", EOS]) == \
        "he didn't go (really)!\nit's fine\n"
    vocab = Vocab.build_word(Vocab.count_words("Don't stop, he said.\n"))
    assert vocab.decode(vocab.encode("Don't stop, he said.\n")) == "Don't stop, he said.\n"


def test_dtype_holds_every_id():
    assert Vocab.build_char("ab").dtype() == numpy.uint8
    assert Vocab("char", [chr(0x4E00 + i) for i in range(300)]).dtype() == numpy.uint16


@pytest.mark.skipif(not (CORPORA / "ptb.test.txt").is_file(), reason="shared PTB corpus not present")
def test_ptb_test_token_count():
    text = (CORPORA / "ptb.test.txt").read_text(encoding="utf-8")
    vocab = Vocab.build_word(Vocab.count_words(text, "whitespace"), "whitespace")
    ids = vocab.encode(text)
    assert len(ids) == 82_430  # 78,669 words + one <eos> for each of the 3,761 lines
    assert int((ids == vocab.eos_id).sum()) == 3_761
    assert vocab.unknown(text) == []
