"""Regularisation drawn from the run's generator, so a resumed run and every data-parallel rank
draw the same: carried-state resets (--state-reset), dropout masks for a rank's columns
(--dropout) and DropConnect on the recurrent weights (--weight-drop)."""

from __future__ import annotations

import contextlib

from ..backend import array_module, to_device
from ..nn.functional import dropout_mask


def reset_some(state: list, chance: float, rng, batch_size: int, part: tuple[int, int]) -> list:
    """Restart the carried state of a random few streams (each with ``chance``).

    Streams otherwise start from a zero state only at the same few positions once an epoch,
    and a model that never learns to start cold can fall into a state it does not leave
    for thousands of characters when evaluation, scoring or sampling starts it at another
    position (seen on tiny Shakespeare: one validation stream at 10.9 nats/char while the
    same text started 21 characters earlier scored 1.41). One draw for each of the
    ``batch_size`` streams, of which this process holds ``part`` (a, b): the number of ranks
    changes no draw."""
    if chance <= 0:
        return state
    a, b = part
    keep = (rng.random(batch_size) >= chance)[a:b]
    if keep.all():
        return state
    h0 = state[0][0]
    mask = to_device(keep, array_module(h0), h0.dtype)
    return [(h * mask, None if c is None else c * mask) for h, c in state]


def rank_dropout_masks(p: float, layers: int, shape: tuple, part: tuple[int, int], rng, xp, dtype) -> list:
    """Data-parallel: this rank's columns of the dropout masks of the whole batch (``shape``
    (H, T, N)), drawn as one process draws them (model.loss_and_grads), so the number of ranks
    changes no mask."""
    a, b = part
    return [xp.ascontiguousarray(dropout_mask(shape, p, rng, xp, dtype)[:, :, a:b]) for _ in range(layers)]


@contextlib.contextmanager
def weights_dropped(params: dict, layers: int, p: float, rng, xp, dtype):
    """--weight-drop P (DropConnect on the recurrent weights, as AWD-LSTM's weight drop):
    inside, each layer's Wh is replaced by Wh * mask, the mask 0 with chance P and 1/(1-P)
    elsewhere, one per layer for the whole chunk (every time step drops the same weights);
    the true Wh is back afterwards, before the update. Yields {name: mask}. The masks come
    from the run's generator before the dropout masks, every rank drawing the same."""
    if p <= 0:
        yield {}
        return
    names = [f"rnn.{layer}.Wh" for layer in range(layers)]
    masks = {n: dropout_mask(params[n].shape, p, rng, xp, dtype) for n in names}
    true = {n: params[n] for n in names}
    try:
        for n in names:
            params[n] = true[n] * masks[n]
        yield masks
    finally:
        params.update(true)
