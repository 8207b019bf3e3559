"""Training, as the library has always named it: ``charnn.train.TrainConfig``, ``Trainer``,
``prepare_data``, ``evaluate`` and the rest. The code lives in the charnn.training package (one
module a job: see its docstring); this module keeps the public names where callers find them."""

from .training import (RESUMABLE, STALE_EVALS, Diverged, Finished, Reporter, RunFolder, RunLock, TrainConfig,
                       TrainError, Trainer, check_resume_state, check_unfinished, evaluate, file_digest, loss_limit,
                       prepare_data, rate_factor, resume_config)

__all__ = ["RESUMABLE", "STALE_EVALS", "Diverged", "Finished", "Reporter", "RunFolder", "RunLock", "TrainConfig",
           "TrainError", "Trainer", "check_resume_state", "check_unfinished", "evaluate", "file_digest", "loss_limit",
           "prepare_data", "rate_factor", "resume_config"]
