"""Training: truncated BPTT over contiguous streams, evaluation, checkpoints and exact resume.

The package's modules, each with one job: config.py (TrainConfig, its errors, the reporter
interface), resume.py (what an exact resume checks), data.py (vocabulary, token cache, split,
evaluation), folder.py (the run folder: lock, metrics, ordered saves), schedule.py (the rate
and early stopping), regularise.py (state resets, dropout masks, weight drop), guard.py (the
divergence guard), ranks.py (data-parallel collectives) and trainer.py (the loop).

A run lives in one folder:

    model.npz       the best model so far by validation loss (the last one without validation)
    last.npz        the latest checkpoint: model, optimizer state, carried hidden state, data
                    position, RNG state and schedule, everything a resume needs
    metrics.jsonl   one JSON object per log interval ("type": "train") and per evaluation
                    ("type": "eval"), each with the step, the epoch as a fraction, the tokens
                    seen and the elapsed seconds, counted across resumes (charnn plot reads it)
    tokens-*.uintN  the corpus encoded once (see corpus.py), memory-mapped while training
    .lock           held while a trainer runs, so two trainers cannot share the folder

Resuming loads last.npz and continues from the same step with the same data chunk, hidden
state, optimizer state and dropout RNG, so the losses equal those of a run never interrupted.
What it cannot restore exactly (a missing or malformed option, progress field, optimizer slot,
carried state, RNG state or corpus digest) it refuses (resume_config, check_resume_state).

Learning-rate schedule: the rate of each step is the base rate times a warm-up factor (linear
from 1/``warmup`` to 1 over the first ``warmup`` steps) times, with ``lr_schedule`` "cosine", a
half cosine from 1 down to ``lr_floor`` over the run's horizon, after holding 1 for the first
``lr_hold`` of it (warm-up, stable, decay): the fraction of the run done is the largest of
step / max_steps, epochs / max_epochs and elapsed seconds / the time horizon (the first
--time-limit, counted across resumes; once passed, a resumed run starts a new cycle over its own
--time-limit). A run limited by steps or epochs alone follows the same rates on every machine;
one limited by time follows the clock. Without any limit the rate stays constant. The base rate
starts at --lr; after each evaluation whose validation loss is not lower than the best
so far, it is multiplied by ``lr_decay`` (1 = constant); after ``patience`` such
evaluations in a row, training stops early (0 = never). Only the scheduled evaluations (every
``eval_every`` steps) count: the extra one at the end of a run that stops between them (at
--max-steps or --time-limit) is reported and may save model.npz, but leaves the schedule alone,
so a run stopped there and resumed takes exactly the steps of a run never stopped.

Divergence: nothing non-finite or exploding is ever written. Before every save the model is
checked: its loss (the validation loss, or without validation data its loss on the first chunk
of the training text) must be finite and at most twice a uniform guess, 2 ln V nats per token
(a fresh model scores about ln V, a learning one below it), and its parameters, optimizer state
and carried hidden state must be finite. Training losses are held to the same limit at every
log interval. A model that fails stops the run with :class:`Diverged`, and the files of the
last save that passed are left as they were; before any save has passed there are none, and
the folder starts a fresh run.

Folder states: saves write last.npz before model.npz until last.npz exists, and model.npz
before last.npz after that, so whatever step a save fails or is killed at, the folder holds
either no model.npz and no last.npz (a fresh run starts) or a last.npz (--resume continues
exactly); a run resumed without model.npz writes it at its next evaluation.
"""

from .config import RESUMABLE, Diverged, Finished, Reporter, TrainConfig, TrainError
from .data import evaluate, file_digest, prepare_data
from .folder import RunFolder, RunLock
from .guard import loss_limit
from .resume import check_resume_state, check_unfinished, resume_config
from .schedule import STALE_EVALS, rate_factor
from .trainer import Trainer

__all__ = ["RESUMABLE", "STALE_EVALS", "Diverged", "Finished", "Reporter", "RunFolder", "RunLock", "TrainConfig",
           "TrainError", "Trainer", "check_resume_state", "check_unfinished", "evaluate", "file_digest", "loss_limit",
           "prepare_data", "rate_factor", "resume_config"]
