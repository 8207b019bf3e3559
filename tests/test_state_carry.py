"""Training carries each stream's hidden state from one chunk to the next.

Watched directly: every call of loss_and_grads during a training run is recorded with the
state it was given and the state it returned. With --state-reset 0 the state given to chunk
k+1 is, bit for bit, the one chunk k returned (within an epoch; a new epoch starts from zero),
and it is not zero; with --state-reset 0.5 some streams restart from zero and the others carry.
"""

from __future__ import annotations

import numpy
import pytest

from charnn.nn.model import LanguageModel

from cli_support import check_ok, train, write_corpus


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = LanguageModel.loss_and_grads

    def recording(self, ids, targets, state=None, *args, **kwargs):
        given = None if state is None else [(numpy.array(h), None if c is None else numpy.array(c)) for h, c in state]
        loss, grads, new = real(self, ids, targets, state, *args, **kwargs)
        seen.append((given, [(numpy.array(h), None if c is None else numpy.array(c)) for h, c in new]))
        return loss, grads, new

    monkeypatch.setattr(LanguageModel, "loss_and_grads", recording)
    return seen


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_is_carried_between_chunks(tmp_path, calls, cell):
    corpus = write_corpus(tmp_path, lines=60)
    check_ok(train(corpus, tmp_path / "run", "--cell", cell, "--state-reset", "0", "--max-steps", 12,
                   "--val-fraction", "0", "--eval-every", 100))
    assert len(calls) == 12
    carried = 0
    for (_, returned), (given, _) in zip(calls, calls[1:]):
        if all(not h.any() for h, _ in given):
            continue  # a new epoch starts from a zero state
        carried += 1
        for (h1, c1), (h2, c2) in zip(returned, given):
            numpy.testing.assert_array_equal(h2, h1)
            if c1 is not None:
                numpy.testing.assert_array_equal(c2, c1)
            assert h1.any()
    assert carried >= 8


def test_state_reset_restarts_some_streams_only(tmp_path, calls):
    corpus = write_corpus(tmp_path, lines=60)
    check_ok(train(corpus, tmp_path / "run", "--state-reset", "0.5", "--max-steps", 12, "--val-fraction", "0",
                   "--eval-every", 100))
    zeroed = kept = 0
    for (_, returned), (given, _) in zip(calls, calls[1:]):
        h_ret, h_giv = returned[0][0], given[0][0]
        if not h_giv.any():
            continue  # a new epoch
        for n in range(h_giv.shape[1]):
            if not h_giv[:, n].any():
                zeroed += 1
            else:
                numpy.testing.assert_array_equal(h_giv[:, n], h_ret[:, n])
                kept += 1
    assert zeroed > 0 and kept > 0
