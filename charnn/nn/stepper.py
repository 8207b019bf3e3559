"""Sampling's step, the reference: N streams advanced one token at a time by the model's own
forward pass over a chunk of one step (engine/stepper.py has the fast twin)."""

from __future__ import annotations

import numpy


class Stepper:
    """Advances N streams one token at a time (for sampling): the reference, a forward pass
    over a chunk of one step. ``state()`` returns the state, ``set_state`` loads one."""

    def __init__(self, model, N: int = 1):
        self.model, self.N = model, N
        self._state = model.initial_state(N)

    def state(self) -> list:
        return [(h.copy(), None if c is None else c.copy()) for h, c in self._state]

    def set_state(self, state):
        self._state = [(h.copy(), None if c is None else c.copy()) for h, c in state]

    def step(self, ids):
        """Feed ``ids`` (N,) host ints; returns the next-token logits (N, V)."""
        logits, self._state = self.model.step(numpy.asarray(ids).reshape(-1), self._state)
        return logits
