"""The model and optimizer a run trains: new, resumed or fine-tuned, and the carried state a
checkpoint restores."""

from __future__ import annotations

import numpy

from ..backend import to_device
from ..nn.functional import class_bounds
from ..nn.model import LanguageModel
from ..nn.optim import make_optimizer
from .config import TrainConfig, TrainError


def build_model(cfg: TrainConfig, vocab_size: int, train_ids, saved, start_config, start_params, backend) -> LanguageModel:
    """The run's model: a fine-tuned one's (``start_config`` and ``start_params``, from
    finetune.InitFrom), a resumed checkpoint's (``saved``, whose architecture must be what the
    options say), or a new one from ``cfg.seed``. A class-factored softmax's classes come from
    the checkpoint, or from the training ids' frequencies."""
    n_classes = cfg.auto_classes(vocab_size)
    bounds = saved.config.class_bounds if saved else \
        class_bounds(numpy.bincount(train_ids, minlength=vocab_size), n_classes) if n_classes else ()
    mcfg = start_config or cfg.model_config(vocab_size, bounds)
    if start_params is not None:
        return LanguageModel(mcfg, start_params, backend)  # a fresh optimizer: build_optimizer
    if saved:
        if saved.config != mcfg:
            raise TrainError("cannot resume: the checkpoint's architecture differs from the options given")
        return LanguageModel(mcfg, saved.params, backend)
    return LanguageModel.create(mcfg, cfg.seed, backend, forget_bias=cfg.forget_bias, input_scale=cfg.input_scale)


def build_optimizer(cfg: TrainConfig, model: LanguageModel):
    try:
        return make_optimizer(cfg.optimizer, model.params, cfg.lr, model.ops, cfg.weight_decay)
    except ValueError as e:  # a checkpoint's options (the command line's are checked before)
        raise TrainError(f"cannot train: {e}") from None


def device_state(state: list, part: tuple[int, int], backend) -> list:
    """A checkpoint's carried state (all N streams, on the host): this process's streams
    ``part`` (a, b), on the device."""
    xp, dtype, (a, b) = backend.xp, backend.dtype, part
    return [(to_device(h[:, a:b], xp, dtype), None if c is None else to_device(c[:, a:b], xp, dtype)) for h, c in state]
