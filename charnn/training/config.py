"""What a training run is asked to do: TrainConfig, its errors, and the reporter interface."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..nn.cells import DEFAULT_CELL, FORGET_BIAS, INPUT_SCALE
from ..nn.model import ModelConfig

# Options that may change when resuming; every other one must match the checkpoint. The corpus
# may be named by another path (run from another folder): its content is checked by digest.
RESUMABLE = {"max_steps", "max_epochs", "time_limit", "eval_every", "log_every", "patience",
             "device", "sample_length", "out", "corpus"}


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why."""


class Diverged(TrainError):
    """The loss became NaN, infinite or exploded."""


class Finished(Exception):
    """A resumed run has already reached its limits: nothing to do, nothing changed (not an
    error: the command says so and exits 0)."""


@dataclass
class TrainConfig:
    corpus: str
    level: str = "char"
    cell: str = DEFAULT_CELL
    layers: int = 2
    hidden: int = 256
    embed: int = 0
    dropout: float = 0.0
    state_reset: float = 0.01  # chance per stream and chunk that its carried state restarts from zero
    forget_bias: float = FORGET_BIAS  # LSTM: the forget gate's initial bias
    input_scale: float = INPUT_SCALE  # one-hot input: layer 0's input weights start U(-this, this); 0 = 1/sqrt(H)
    activation: str = "tanh"
    tie: bool = False
    classes: int = -1  # class-factored softmax classes; 0 = full softmax; -1 = auto (see auto_classes)
    tokenizer: str = "regex"
    vocab_size: int | None = None
    min_count: int = 1
    seq_len: int = 50
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float | None = None
    lr_decay: float = 1.0
    lr_schedule: str = "cosine"  # or "constant" (measured: README, the quick start with each schedule)
    lr_floor: float = 0.05  # cosine: the last step's rate, as a fraction of the base rate
    warmup: int = 0  # steps of linear warm-up
    lr_hold: float = 0.6  # cosine: the fraction of the horizon at the full rate before the decay starts
    weight_decay: float = 0.0  # Adam only: decoupled weight decay of the weight matrices (AdamW)
    weight_drop: float = 0.0  # DropConnect on the recurrent weights Wh, one mask per layer and step
    clip: float = 5.0
    max_epochs: int | None = None
    max_steps: int | None = None
    time_limit: float | None = None
    val_fraction: float = 0.1
    val: str | None = None
    eval_every: int = 500
    log_every: int = 20
    patience: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    encoding: str = "utf-8"
    errors: str = "strict"
    sample_length: int = 200
    out: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    # Fields added after runs were saved without them, with the value those runs used (not
    # today's default), so an old run resumes exactly as it would have.
    LEGACY = {"forget_bias": 1.0, "state_reset": 0.0, "lr_schedule": "constant", "lr_floor": 0.1, "warmup": 0, "lr_hold": 0.0,
              "weight_decay": 0.0, "input_scale": 0.0, "weight_drop": 0.0}

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{**cls.LEGACY, **{k: v for k, v in d.items() if k in known}})

    def model_config(self, vocab_size: int, class_bounds=()) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, cell=self.cell, layers=self.layers, hidden=self.hidden,
                           embed=self.embed, dropout=self.dropout, activation=self.activation, tie=self.tie,
                           class_bounds=tuple(class_bounds))

    def auto_classes(self, vocab_size: int) -> int:
        """-1 (auto): about sqrt(V) classes for word vocabularies over 1,000 words, else a full
        softmax (small vocabularies gain nothing from classes)."""
        if self.classes >= 0:
            return self.classes
        return round(math.sqrt(vocab_size)) if self.level == "word" and vocab_size > 1000 else 0


class Reporter:
    """Receives a run's events (its start, log lines, evaluations, messages, end); the CLI shows
    them, tests ignore them."""

    def start(self, info: dict): ...
    def log(self, m: dict): ...
    def evaluation(self, m: dict, sample: str | None): ...
    def message(self, text: str): ...
    def end(self): ...
