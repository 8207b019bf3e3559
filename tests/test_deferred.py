"""The batch split's shared tail (engine/threads.py's Deferred): both halves' deferred work runs exactly
once, a slow half's work is taken by the other, failures end without a hang, and training
steps with the weight gradients deferred equal those without."""

import threading
import time

import numpy
import pytest

import charnn.engine.threads as threads_mod
from charnn.backend import get_backend
from charnn.engine import parallel
from charnn.engine.settings import Settings
from charnn.engine.threads import Deferred, in_row_blocks, with_tail
from charnn.nn.model import LanguageModel, ModelConfig


def run_halves(halves, tail):
    """Run halves[0] and halves[1] in two threads, each closing ``tail`` at its end as the
    model's batch split does (threads.with_tail); returns the exception each raised (or None)."""
    errors = [None, None]

    def body(k):
        try:
            with_tail(tail, lambda put: halves[k]())
        except BaseException as e:  # noqa: BLE001 - checked by the test
            errors[k] = e

    threads = [threading.Thread(target=body, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
        assert not t.is_alive(), "a half never returned"
    return errors


def test_every_piece_runs_once_and_a_slow_half_is_helped():
    tail = Deferred(2)
    ran = []  # (half that put it, piece, thread that ran it)
    lock = threading.Lock()

    def piece(owner, j):
        def fn():
            time.sleep(0.01)
            with lock:
                ran.append((owner, j, threading.current_thread().name))
        return fn

    def fast():
        threading.current_thread().name = "fast"
        for j in range(3):
            tail.put(piece("fast", j))

    def slow():
        threading.current_thread().name = "slow"
        for j in range(6):
            tail.put(piece("slow", j))
        time.sleep(0.3)  # still on its own chain while the fast half has finished

    assert run_halves([fast, slow], tail) == [None, None]
    assert sorted((o, j) for o, j, _ in ran) == sorted([("fast", j) for j in range(3)] + [("slow", j) for j in range(6)])
    assert all(t == "fast" for _, _, t in ran)  # the slow half was still busy with its own work


def test_a_half_that_fails_before_closing_does_not_hang_the_other():
    tail = Deferred(2)
    ran = []

    def ok():
        tail.put(lambda: ran.append("ok"))
        time.sleep(0.05)

    def bad():
        tail.put(lambda: ran.append("bad's"))
        raise ValueError("boom")

    errors = run_halves([ok, bad], tail)
    assert errors[0] is None and isinstance(errors[1], ValueError)
    assert sorted(ran) == ["bad's", "ok"]


def test_a_failing_piece_raises_in_the_thread_that_ran_it():
    tail = Deferred(2)

    def fail():
        raise RuntimeError("piece failed")

    def one():
        tail.put(fail)

    errors = run_halves([one, lambda: time.sleep(0.05)], tail)
    assert sum(isinstance(e, RuntimeError) for e in errors) == 1
    assert sum(e is None for e in errors) == 1


def test_row_blocks_cover_every_row_once(monkeypatch):
    monkeypatch.setattr(threads_mod, "DEFER_BLOCK_FLOPS", 10.0)
    pieces = []
    seen = numpy.zeros(103, dtype=int)

    def fn(r):
        seen[r] += 1

    in_row_blocks(pieces.append, 103, fn, 1e6)
    assert len(pieces) == 4  # at most four pieces
    for p in pieces:
        p()
    assert (seen == 1).all()
    in_row_blocks(None, 103, fn, 1e6)  # no defer: at once, all rows
    assert (seen == 2).all()


@pytest.mark.parametrize("cell,embed,layers,classes", [("lstm", 0, 2, ()), ("lstm", 6, 1, ()), ("gru", 0, 2, ()),
                                                       ("rnn", 6, 2, ()), ("lstm", 6, 2, (0, 2, 5, 11))])
def test_training_step_with_deferred_weight_gradients_equals_without(monkeypatch, cell, embed, layers, classes):
    """The same split, the weight gradients deferred (in pieces, either thread) or not: the
    same loss, and the same gradients but for rounding (a product cut into row blocks may sum
    in another order: OpenBLAS picks its kernels by size). With a class-factored output
    layer the split takes another path (the output layer once between the halves)."""
    cfg = ModelConfig(vocab_size=11, cell=cell, layers=layers, hidden=24, embed=embed, class_bounds=classes)
    rng = numpy.random.default_rng(3)
    T, N = 7, 32  # halves of 16 streams: the batch split (thinner halves take the row split)
    ids = rng.integers(0, 11, (T, N))
    targets = rng.integers(0, 11, (T, N))
    monkeypatch.setattr(threads_mod, "DEFER_BLOCK_FLOPS", 1e3)  # several pieces a product
    out = {}
    real_put = Deferred.put
    for mode, threshold in (("deferred", 0.0), ("at once", float("inf"))):
        monkeypatch.setattr(parallel, "DEFER_FLOPS", threshold)
        m = LanguageModel.create(cfg, seed=1, backend=get_backend("cpu", "float32", settings=Settings(threads=2)))
        puts = []
        monkeypatch.setattr(Deferred, "put", lambda self, fn, real=real_put: (puts.append(1), real(self, fn)))
        loss, grads, _ = m.loss_and_grads(ids, targets)
        out[mode] = (float(loss), {k: numpy.array(v) for k, v in grads.items()}, len(puts))
    assert out["deferred"][2] >= 2 * layers and out["at once"][2] == 0
    assert out["deferred"][0] == out["at once"][0]
    assert out["deferred"][1].keys() == out["at once"][1].keys()
    for name, g in out["at once"][1].items():  # (float32: the two sum in another order; atol about 8 ulps of the largest entry)
        numpy.testing.assert_allclose(out["deferred"][1][name], g, rtol=1e-5, atol=1e-6 * numpy.abs(g).max(), err_msg=name)
