"""What the trainer does together with the other ranks of a data-parallel run (dist.py), each
a no-op, or the plain call, with one process."""

from __future__ import annotations

import hashlib

import numpy

from ..backend import to_host
from ..nn.optim import clip_scale, global_norm
from ..io import checkpoint as ckpt_mod
from ..io.data import CorpusError
from .config import TrainError


def together(world, fn, root_only: bool = False):
    """Run ``fn`` (on rank 0 alone with ``root_only``) and agree on how it went: a TrainError,
    CorpusError, CheckpointError or OSError on any rank is raised on every rank
    (dist.World.agree), so they all leave together. One process: just ``fn()``."""
    if world.size == 1:
        return fn()
    error = result = None
    if world.root or not root_only:
        try:
            result = fn()
        except (TrainError, CorpusError, ckpt_mod.CheckpointError, OSError) as e:
            error = e
    world.agree(error)
    return result


def host_state(state) -> list:
    return [(to_host(h), None if c is None else to_host(c)) for h, c in state]


def all_state(world, state):
    """The carried state of all N streams on the host, on rank 0 (None elsewhere): every rank's
    columns, gathered (a collective)."""
    local = host_state(state)
    if world.size == 1:
        return local
    parts = world.gather(local)
    if parts is None:
        return None
    return [(numpy.concatenate([q[layer][0] for q in parts], axis=1),
             None if c is None else numpy.concatenate([q[layer][1] for q in parts], axis=1))
            for layer, (_, c) in enumerate(local)]


def check_same_params(world, params: dict, step: int):
    """Raise TrainError on every rank unless every rank holds the same parameters (a digest of
    them each), so a model only rank 0 holds is never saved. The same summed gradients and the
    same rate give every rank the same update; this checks it, at each save (a SHA-256 of the
    parameters: a few milliseconds a megabyte)."""
    if world.size == 1:
        return
    digest = hashlib.sha256()
    for a in params.values():
        digest.update(numpy.ascontiguousarray(to_host(a)).tobytes())
    digests = world.allgather(digest.hexdigest())
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]

    def check():
        if differ:
            raise TrainError(f"at step {step:,} rank(s) {', '.join(map(str, differ))} hold other parameters than "
                             f"rank 0 (their updates differed); nothing was saved, the last checkpoint is kept")

    together(world, check)


def set_up(world, set_up_root, set_up_other, shared_of):
    """Set up every rank: rank 0 first (``set_up_root()``: it locks the folder and builds the
    token cache while the others wait), then the others from what it found
    (``set_up_other(shared_of())``, broadcast: no rank reads the corpus again). An error of
    either stage is agreed on, so every rank leaves."""
    error = None
    if world.root:
        try:
            set_up_root()
        except Exception as e:
            if world.size == 1:
                raise
            error = e
    if world.size > 1:
        world.agree(error)
        shared = world.bcast(shared_of() if world.root else None)
        error = None
        if not world.root:
            try:
                set_up_other(shared)
            except Exception as e:
                error = e
        world.agree(error)


def mean_update(opt, grads: dict, ops, clip: float, K: int, xp):
    """The update from gradients summed over K ranks: the sums are K times the means over the
    whole batch, so the norm is divided by K and the update's scale (clipping) multiplied by
    1/K (exact for K a power of two)."""
    norm = global_norm(grads, ops) / K
    scale = clip_scale(norm, clip)
    scale = (xp.ones((), dtype=norm.dtype) if scale is None else scale) * (1.0 / K)
    opt.step(grads, scale)
