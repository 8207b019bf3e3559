"""charnn score's rough edges: a terminal on stdin says what it waits for; counts read "1 line"."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from charnn.wording import plural

from cli_support import check_ok, invoke, train, write_corpus


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("score")
    check_ok(train(write_corpus(folder), folder / "run", "--max-steps", 4))
    return folder / "run"


def test_plural():
    assert plural(1, "line") == "1 line" and plural(0, "line") == "0 lines" and plural(2000, "line") == "2,000 lines"
    assert plural(1, "class") == "1 class" and plural(3, "class") == "3 classes"


def test_one_line_reads_in_the_singular(model):
    r = check_ok(invoke("score", model, "-", input="the cat sat\n"))
    assert "1 line " in r.stdout and "1 lines" not in r.stdout
    r = check_ok(invoke("score", model, "-", input="the cat sat\nthe dog ran\n"))
    assert "2 lines" in r.stdout
    r = check_ok(invoke("score", model, "-", input="the cat #\n"))
    assert "1 character not in the model's vocabulary was left out" in r.stderr
    assert "1 unknown character left out" in r.stdout


def read_until(fd, needle: bytes, timeout: float) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return got


def test_a_terminal_on_stdin_is_told_what_score_waits_for(model):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "charnn", "score", str(model), "--device", "cpu"],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    os.close(slave)
    try:
        err = read_until(proc.stderr.fileno(), b"Ctrl-D", 60)
        assert b"reading sentences from the terminal" in err and b"Ctrl-D" in err, err
        os.write(master, b"the cat sat\n\x04")  # a line, then end of input (Ctrl-D)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and b"1 line" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_a_pipe_on_stdin_gets_no_such_note(model):
    r = check_ok(invoke("score", model, input="the cat sat\n"))
    assert "reading sentences" not in r.stderr
