"""The model and optimizer a run trains: new, resumed or fine-tuned, the memory they and a
step will take (checked before any is allocated), and the carried state a checkpoint restores."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy

from .. import memory
from ..backend import to_device
from ..nn.functional import class_bounds
from ..nn.model import LanguageModel, ModelConfig
from ..nn.optim import make_optimizer
from ..wording import plural
from .config import TrainConfig, TrainError


def model_config(cfg: TrainConfig, vocab_size: int, train_ids, saved, start_config) -> ModelConfig:
    """The run's architecture: a fine-tuned model's (``start_config``, from finetune.InitFrom),
    or the options' (a resumed checkpoint's classes, or a class-factored softmax's classes from
    the training ids' frequencies)."""
    n_classes = cfg.auto_classes(vocab_size)
    bounds = saved.config.class_bounds if saved else \
        class_bounds(numpy.bincount(train_ids, minlength=vocab_size), n_classes) if n_classes else ()
    return start_config or cfg.model_config(vocab_size, bounds)


def check_memory(cfg: TrainConfig, config: ModelConfig, streams: int, max_memory: int | None = None,
                 host_only: bool = False, vocab_known: bool = True):
    """Refuse (memory.MemoryLimitError) a run whose model, optimizer state and step over
    ``streams`` (this process's share of the batch) would pass the memory available or
    ``max_memory`` bytes (memory.training), blaming the option whose default would lower the
    estimate most, else naming the model (``vocab_known``: its vocabulary too). ``host_only``:
    the step's arrays live on a GPU (or may: --device auto), so only the host's part counts."""
    shape = memory.Shape.of(config)

    def estimate(T=cfg.seq_len, N=streams, **changes):
        return memory.training(replace(shape, **changes), T, N, cfg.optimizer, cfg.dtype, cfg.weight_drop,
                               "gpu" if host_only else "cpu")

    default = {f.name: f.default for f in fields(TrainConfig)}
    options = {"--hidden": ("hidden", cfg.hidden, default["hidden"]),
               "--layers": ("layers", cfg.layers, default["layers"]),
               "--embed": ("embed", cfg.embed, default["embed"]),
               "--batch-size": ("N", cfg.batch_size, default["batch_size"]),
               "--seq-len": ("T", cfg.seq_len, default["seq_len"])}
    model = f"a {config.cell} {config.layers}x{config.hidden} model"
    if vocab_known:
        model += f" of {plural(config.vocab_size, 'token')}" + (" (--vocab-size caps them)" if cfg.level == "word" else "")
    subject = memory.culprit(lambda **c: estimate(**c).bytes, options, model)
    memory.check(estimate(), subject, max_memory)


def build_model(cfg: TrainConfig, mcfg: ModelConfig, saved, start_params, backend) -> LanguageModel:
    """The run's model of architecture ``mcfg`` (:func:`model_config`): a fine-tuned one's
    (``start_params``, from finetune.InitFrom), a resumed checkpoint's (``saved``, whose
    architecture must be what the options say), or a new one from ``cfg.seed``."""
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


def check_memory_early(cfg, saved, vocab, fine_tuning: bool, streams: int, max_memory):
    """The memory check before the corpus is read: a resumed run's saved architecture; a new
    one's with the smallest vocabulary there can be (the real one is checked once known), and
    on "auto" only what stays on the host. (A fine-tuned run's is checked once its model is
    read.)"""
    if saved:
        check_memory(cfg, saved.config, streams, max_memory, host_only=cfg.device != "cpu")
    elif not fine_tuning:
        check_memory(cfg, cfg.model_config(len(vocab) if vocab else 2), streams, max_memory,
                     host_only=cfg.device != "cpu", vocab_known=vocab is not None)
