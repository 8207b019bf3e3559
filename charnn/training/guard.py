"""The divergence guard: nothing non-finite or exploding is ever written.

Before every save the model is checked: its loss (the validation loss, or without validation
data its loss on the first chunk of the training text) must be finite and at most twice a
uniform guess, 2 ln V nats per token (a fresh model scores about ln V, a learning one below
it), and its parameters, optimizer state and carried hidden state must be finite. Training
losses are held to the same limit at every log interval. A model that fails stops the run with
:class:`Diverged`, and the files of the last save that passed are left as they were.
"""

from __future__ import annotations

import math

from .config import Diverged


def loss_limit(vocab_size: int) -> float:
    """The loss (nats per token) above which a model counts as exploding: twice a uniform
    guess's ln V. A model there predicts worse than guessing blindly by a factor of V."""
    return 2.0 * math.log(vocab_size)


def loss_problem(loss: float, what: str, vocab_size: int) -> str | None:
    """Why ``loss`` (its ``what``) shows a diverged model, or None."""
    limit = loss_limit(vocab_size)
    if not math.isfinite(loss):
        return f"{what} {loss}"
    if loss > limit:
        return f"{what} {loss:.4g} nats/token, above the limit {limit:.3g} = 2 ln V"
    return None


def first_non_finite(groups, xp) -> str | None:
    """The first array of ``groups`` ((kind, ((name, array), ...)), ...) holding NaN or an
    infinity, named; None when all are finite (a model can be finite while its Adam moments
    overflowed to inf)."""
    for kind, arrays in groups:
        for name, a in arrays:
            if not bool(xp.isfinite(a).all()):
                return f"{kind} {name} holds NaN or infinite values"
    return None


def diverged(step: int, why: str, saved_step: int | None, out) -> Diverged:
    """The error that stops a diverged run, saying what is kept. (--lr and --clip cannot
    change on --resume, which would not be exact: a retry with lower ones needs another
    folder, unless nothing was saved.)"""
    if saved_step is not None:
        kept = (f"the last good checkpoint (step {saved_step}) is kept in {out}. "
                f"Try a lower --lr or --clip in another --out")
    else:
        kept = (f"no good checkpoint exists yet, so nothing was saved and {out} starts a fresh run "
                f"when trained again. Try a lower --lr or --clip")
    return Diverged(f"training diverged at step {step} ({why}); {kept}")
