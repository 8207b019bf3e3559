"""The run folder: its lock, its metrics file, the order of its saves, and what a failed start
or a killed save leaves behind (nothing).

    model.npz       the best model so far by validation loss (the last one without validation)
    last.npz        the latest checkpoint: everything a resume needs
    metrics.jsonl   one JSON object per log interval and per evaluation
    tokens-*.uintN  the corpus encoded once (io/corpus.py), memory-mapped while training
    .lock           held while a trainer runs, so two trainers cannot share the folder
    corpus-stdin.txt  a corpus read from stdin, kept for --resume

run_file() says which of these a path is, for commands that must never replace them (export).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..io import checkpoint as ckpt_mod
from ..io.fileio import file_kind
from ..io.metrics import MetricsError, read_lines
from .config import TrainError

METRICS_NAME = "metrics.jsonl"
STDIN_NAME = "corpus-stdin.txt"  # where a corpus read from stdin is kept in the run folder


class RunLock:
    """An exclusive lock on a run folder (fcntl), so a second trainer is refused, not mixed in.

    The lock file is removed on exit while the lock is still held, so a clean exit leaves no
    ``.lock`` behind. That opens one race, closed on the acquiring side: a trainer that opened
    the file just before the holder removed it can lock the removed file once the holder lets
    go, while a third trainer creates and locks a new one. So after locking, a trainer checks
    that the path still names the file it locked (same device and inode) and otherwise starts
    over with the file now there. Any file that the path names is then only ever locked by
    one trainer at a time, and a trainer only holds the lock on the file the path names."""

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.path = folder / self.NAME
        self.fd = None

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self):
        import fcntl

        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise TrainError(f"{self.path.parent}: another charnn train is using this folder") from None
            try:
                named = os.stat(self.path)
            except FileNotFoundError:
                named = None
            held = os.fstat(fd)
            if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                self.fd = fd
                return self
            os.close(fd)  # the holder removed this file while we opened it: try the one there now

    def __exit__(self, *exc):
        import fcntl

        if self.fd is not None:
            try:
                self.path.unlink()  # still locked: no other trainer holds this file
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunFolder:
    """The files of one run folder, each written the one way that leaves no torn or dead-end
    state (see the module docstring of charnn.train for the order of saves)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.last = self.out / ckpt_mod.LAST_NAME
        self.best = self.out / ckpt_mod.BEST_NAME
        self.metrics = self.out / METRICS_NAME

    def holds_run(self) -> bool:
        return self.last.exists() or self.best.exists()

    def check_fresh(self):
        """A new run (not --resume) needs a folder that holds none."""
        if self.last.exists():
            raise TrainError(f"{self.out}: already holds a run; pass --resume to continue it, or choose another --out")
        if self.best.exists():
            raise TrainError(f"{self.out}: already holds a {ckpt_mod.BEST_NAME} (with no {ckpt_mod.LAST_NAME} to resume "
                             f"from); choose another --out, or move {ckpt_mod.BEST_NAME} away to start afresh here")

    def append_metric(self, m: dict):
        try:
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(m) + "\n")
        except OSError as e:  # a torn line is dropped by the next start's trim_metrics
            raise TrainError(f"cannot write {self.metrics}: {e.strerror or e}") from None

    def trim_metrics(self, step: int):
        """On resume, drop metric lines written after the checkpoint (they will be redone)."""
        path = self.metrics
        if not path.exists():
            return
        if file_kind(path):
            raise TrainError(f"{path}: is {file_kind(path)}, not a regular file; cannot resume")
        keep = []
        try:
            for n, line in read_lines(path):  # (a line at a time, at most MAX_LINE bytes of it)
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                except (ValueError, RecursionError):  # an integer of 4,300 digits; nesting past the stack
                    m = None
                at = m.get("step", 0) if isinstance(m, dict) else None
                if isinstance(at, bool) or not isinstance(at, (int, float)):
                    raise TrainError(f"{path}: line {n} is not a JSON object with a numeric step (charnn writes "
                                     f"those); move the file away to resume")
                if at <= step:
                    keep.append(line)
        except MetricsError as e:
            raise TrainError(f"{e}; move it away to resume") from None
        ckpt_mod.atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode("utf-8"))

    def save(self, best: bool, write_last, write_best):
        """Save last.npz (``write_last()``), and model.npz too when ``best``, in the order that
        leaves no dead end.

        Until last.npz exists it is written first: a save that fails or is killed after it
        leaves a run that resumes (and writes model.npz at its next evaluation), one that fails
        before it leaves no model file at all, and a fresh run starts. model.npz alone, which
        neither a fresh run nor --resume accepts, never appears. Later, model.npz is written
        first, so last.npz never promises a better model.npz than the one on disk."""
        if best and self.last.exists():
            write_best()
            write_last()
        else:
            write_last()
            if best:
                write_best()

    def remove_stale_temp_files(self):
        """Remove temporary files of saves that a kill interrupted (checkpoint.atomic_write_bytes
        names them .NAME.XXXX.tmp); safe while this process holds the run lock."""
        for name in (ckpt_mod.BEST_NAME, ckpt_mod.LAST_NAME, METRICS_NAME):
            for tmp in self.out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def copy_stream(self, stream, path: Path) -> Path:
        """Copy a corpus stream (stdin) into ``path`` in the run folder, once, so digests,
        token caches and --resume read a regular file."""
        data = stream.read()
        try:
            ckpt_mod.atomic_write_bytes(path, data)
        except OSError as e:
            raise TrainError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def create(self) -> bool:
        """Make the folder (and its parents); whether it was new."""
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"{self.out}: cannot create the run folder: {e.strerror or e}") from None
        return created

    def snapshot(self) -> dict:
        """What a start that fails must not leave behind: taken before the start."""
        return {"lock": (self.out / RunLock.NAME).exists(), "caches": set(self.out.glob("tokens-*"))}

    def undo_start(self, before: dict, created: bool, stdin_copy: Path | None):
        """Nothing of the run was written yet: leave no token cache, lock file, corpus copy or
        empty run folder behind."""
        for cache in set(self.out.glob("tokens-*")) - before["caches"]:
            cache.unlink(missing_ok=True)
        if stdin_copy is not None:
            stdin_copy.unlink(missing_ok=True)
        if not before["lock"]:
            (self.out / RunLock.NAME).unlink(missing_ok=True)
        if created:
            try:
                self.out.rmdir()
            except OSError:
                pass


def checkpoint_meta(cfg, counters: dict, rng_state: dict, corpus_digest: str, val_digest: str | None,
                    init_record: dict | None, policy_record: dict | None = None) -> dict:
    """The metadata of a run's model files: the options, the run's counters (as "progress"), the
    random generator's state, the digests of the corpus and validation file, where a fine-tuned
    run started, and what the policy chose its model from (training/policy.py)."""
    meta = {"train": cfg.to_json(), "progress": counters, "rng": rng_state, "corpus_sha256": corpus_digest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if val_digest:
        meta["val_sha256"] = val_digest
    if init_record:
        meta["init_from"] = init_record
    if policy_record:
        meta["policy"] = policy_record
    return meta


def run_file(path) -> str | None:
    """What ``path`` (symbolic links resolved) is to the run folder it sits in, when training
    writes it there ("the resume checkpoint last.npz"); None for any other file, and for any
    file of a folder that holds no run (none of model.npz, last.npz, metrics.jsonl, .lock)."""
    p = Path(os.path.realpath(path))
    names = {ckpt_mod.BEST_NAME: "the best model", ckpt_mod.LAST_NAME: "the resume checkpoint",
             METRICS_NAME: "the metrics", RunLock.NAME: "the lock", STDIN_NAME: "the corpus kept from stdin"}
    if not any((p.parent / n).exists() for n in (ckpt_mod.BEST_NAME, ckpt_mod.LAST_NAME, METRICS_NAME, RunLock.NAME)):
        return None
    what = names.get(p.name) or ("a token cache" if p.name.startswith("tokens-") else None)
    return f"{what} {p.name}" if what else None
