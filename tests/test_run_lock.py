"""The run folder's lock: a second trainer is refused, and the lock file is removed on exit
without letting two trainers in (see train.RunLock)."""

from __future__ import annotations

import os

import pytest

from charnn.train import RunLock, TrainError

from cli_support import charnn_process, check_ok, train, wait_for, write_corpus


def test_clean_exit_leaves_no_lock_file(tmp_path):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 2))
    assert not (out / ".lock").exists()


def test_lock_is_exclusive_and_removed_on_exit(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").exists()
        with pytest.raises(TrainError, match="another charnn train"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path):  # and the folder can be locked again
        pass


def test_a_trainer_that_opened_the_removed_lock_file_does_not_hold_the_folder(tmp_path):
    """The race the removal opens: B opens .lock, A (the holder) removes it and lets go, B locks
    the removed file. B must notice and lock the file the path names now, so that a third
    trainer C is refused rather than let in beside B."""
    a = RunLock(tmp_path).__enter__()

    class Late(RunLock):
        opened = 0

        def _open(self):
            fd = super()._open()
            Late.opened += 1
            if Late.opened == 1:
                a.__exit__(None, None, None)  # A finishes between B's open and B's lock
            return fd

    b = Late(tmp_path).__enter__()
    assert Late.opened == 2  # B saw that its first file was gone and started over
    held, named = os.fstat(b.fd), os.stat(tmp_path / ".lock")
    assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    with pytest.raises(TrainError, match="another charnn train"):
        RunLock(tmp_path).__enter__()
    b.__exit__(None, None, None)
    assert not (tmp_path / ".lock").exists()


def test_a_second_trainer_is_refused_while_the_first_runs(tmp_path):
    corpus = write_corpus(tmp_path, lines=2000)
    out = tmp_path / "run"
    first = charnn_process("train", corpus, "--out", out, "--hidden", 16, "--layers", 1, "--seq-len", 8,
                           "--batch-size", 4, "--device", "cpu", "-q", "--max-steps", 100000, "--eval-every", 2,
                           "--sample-length", 0)
    try:
        assert wait_for(lambda: (out / "last.npz").exists(), first)
        second = charnn_process("train", "--resume", "--out", out, "-q")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1 and b"another charnn train is using this folder" in err
        assert (out / ".lock").exists()
    finally:
        first.terminate()  # SIGTERM: no checkpoint, the process ends
        first.wait(timeout=60)
