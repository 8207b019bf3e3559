"""When to stop and at what rate: the learning-rate schedule as a pure function, and the
bookkeeping of evaluations (best model, rate decay, early stopping, the overfitting note).

The rate of each step is the base rate times a warm-up factor (linear from 1/``warmup`` to 1
over the first ``warmup`` steps) times, with ``lr_schedule`` "cosine", a half cosine from 1
down to ``lr_floor`` over the run's horizon, after holding 1 for the first ``lr_hold`` of it
(warm-up, stable, decay): the fraction of the run done is the largest of step / max_steps, epochs / max_epochs
and elapsed seconds / the time horizon (the first --time-limit, counted across resumes; once
passed, a resumed run starts a new cycle over its own --time-limit). The base rate starts at
--lr; after each scheduled evaluation whose validation loss is not lower than the best so far
it is multiplied by ``lr_decay``, and after ``patience`` such evaluations in a row training
stops early (0 = never).
"""

from __future__ import annotations

import math

from .config import TrainConfig

# Scheduled evaluations in a row without a better validation loss after which a run without
# --patience says that its best model is behind it (once per process).
STALE_EVALS = 3


def rate_factor(cfg: TrainConfig, step: int, epochs: float, elapsed: float | None, horizon: float | None) -> float:
    """The schedule's factor for the step after ``step``: ``epochs`` done (a fraction), the
    run's ``elapsed`` seconds and its time ``horizon`` (None or 0: no time horizon)."""
    factor = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.lr_schedule == "cosine":
        done = []
        if cfg.max_steps is not None:
            done.append(step / cfg.max_steps)
        if cfg.max_epochs is not None:
            done.append(epochs / cfg.max_epochs)
        if horizon:
            done.append(elapsed / horizon)
        if done:
            x = max(min(max(done), 1.0) - cfg.lr_hold, 0.0) / (1.0 - cfg.lr_hold)
            factor *= cfg.lr_floor + (1.0 - cfg.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * x))
    return factor


def limit_reached(cfg: TrainConfig, counters: dict, out_of_time: bool) -> str | None:
    """Which limit the run has reached, if any: "max_steps", "max_epochs" or "time_limit"."""
    if cfg.max_steps is not None and counters["step"] >= cfg.max_steps:
        return "max_steps"
    if cfg.max_epochs is not None and counters["epoch"] >= cfg.max_epochs:
        return "max_epochs"
    if cfg.time_limit is not None and out_of_time:
        return "time_limit"
    return None


def record_evaluation(counters: dict, val: float, cfg: TrainConfig, scheduled: bool, best_on_disk: bool) -> bool:
    """Update the run's ``counters`` with an evaluation's loss ``val``; returns whether the model is the
    best so far (to be saved as model.npz).

    Only ``scheduled`` evaluations (every eval_every steps) decay the rate and count towards
    early stopping (``best_val``, ``bad_evals``), so an extra evaluation where a run stops cannot
    change the steps of its resumed run. ``best_saved`` is the loss of the model in model.npz,
    over all evaluations; with no model.npz on disk (a resumed run whose first save failed
    before writing it) the model is saved whatever its loss."""
    p = counters
    if scheduled:
        if p["best_val"] is None or val < p["best_val"]:
            p["best_val"] = val
            p["bad_evals"] = 0
        else:
            p["bad_evals"] += 1
            if cfg.lr_decay != 1.0:
                p["lr"] *= cfg.lr_decay
    improved = p["best_saved"] is None or val < p["best_saved"] or not best_on_disk
    if improved:
        p["best_saved"] = val
        p["best_step"], p["best_seconds"] = p["step"], p["train_seconds"]
    p["last_val"] = val
    return improved


def stop_early(cfg: TrainConfig, counters: dict) -> bool:
    return bool(cfg.patience) and counters["bad_evals"] >= cfg.patience


def stale_note(cfg: TrainConfig, counters: dict) -> str | None:
    """The note a run without --patience gets when its best model is STALE_EVALS scheduled
    evaluations old (None otherwise)."""
    p = counters
    if cfg.patience or p["bad_evals"] != STALE_EVALS:
        return None
    best_at = "" if p.get("best_step") is None else f" at step {p['best_step']:,}"
    return (f"charnn train: validation loss has not improved for {STALE_EVALS} evaluations (best "
            f"{p['best_saved']:.4f}{best_at}); model.npz keeps that model. The model may be overfitting this "
            f"corpus: --dropout or a smaller --hidden may do better, and --patience N ends a run after N "
            f"evaluations without improvement")
