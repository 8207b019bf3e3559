"""Fine-tuning: a new run that starts from a trained model's weights and vocabulary.

``charnn train NEW.txt --init-from MODEL`` (torch-rnn's ``-init_from``) takes MODEL's
architecture and parameters and trains them on NEW.txt with a fresh optimizer, data position
and schedule. What the model fixes is taken from it: the architecture options (``ARCH``) and
the vocabulary; an architecture option given on the command line must agree with the model.

Tokens of the new corpus the model never saw are an error naming them, unless the vocabulary
is extended (``extend=True``). Extending appends the new tokens after the old ones, so every
old id, and so every trained row, keeps its place:

    embed.W      (V', E)      new rows as a new model's: N(0, 1), or U(-0.1, 0.1) when tied
    rnn.0.Wx     (G*H, V')    one-hot input (E = 0): new columns U(-1/sqrt(H), 1/sqrt(H))
    head.W       (V', H)      new rows U(-1/sqrt(H), 1/sqrt(H)); tied models have none: the new
                              embedding rows serve as both
    head.b       (V',)        new entries 0
    class.W, .b  unchanged    class-factored softmax: the new words join the last class (the
                              rarest words under frequency binning), whose bound moves to V'

The new rows are the rows of ``init_params`` for the extended architecture with the run's
seed: exactly what a new model of that shape would start with.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from .io import checkpoint as ckpt_mod
from .io.fileio import sha256_file
from .io.vocab import Vocab, tokenize_line
from .nn.cells import INPUT_SCALE
from .nn.model import ModelConfig, init_params
from .wording import plural

# TrainConfig fields fixed by the model, and how each is read from a checkpoint.
ARCH = ("level", "tokenizer", "cell", "layers", "hidden", "embed", "activation", "tie", "classes")
SHOWN = 5  # unknown tokens named in an error


class FineTuneError(ValueError):
    """The model cannot start this run; the message says why (one line)."""


def arch_of(ckpt) -> dict:
    """The architecture options of a checkpoint, as TrainConfig values."""
    c, v = ckpt.config, ckpt.vocab
    return {"level": v.level, "tokenizer": v.tokenizer, "cell": c.cell, "layers": c.layers, "hidden": c.hidden,
            "embed": c.embed, "activation": c.activation, "tie": c.tie, "classes": c.n_classes}


def merge_options(opts: dict, explicit: set, ckpt, path) -> dict:
    """``opts`` with the model's architecture; an option given (``explicit``) that contradicts
    it raises FineTuneError naming the option. Dropout is the model's unless given."""
    arch = arch_of(ckpt)
    for key in ARCH:
        if key not in opts:
            continue
        model_value = arch[key]
        if key == "tokenizer" and arch["level"] != "word":
            continue  # a char model has no tokenizer; the option does nothing there
        given = opts[key]
        same = given == model_value or (key == "classes" and given == -1)
        if key in explicit and not same:
            option = f"--{'no-' if key == 'tie' and not given else ''}{key.replace('_', '-')}"
            shown = "" if key == "tie" else f" {given}"
            raise FineTuneError(f"{option}{shown} contradicts the model {path} ({_arch_text(key, model_value)}); "
                                f"leave it out to take the model's")
        opts[key] = model_value
    if "vocab_size" in explicit and opts.get("vocab_size") is not None:
        raise FineTuneError("--vocab-size cannot be used with --init-from: the vocabulary is the model's "
                            "(--extend-vocab adds the new corpus's tokens to it)")
    if "dropout" not in explicit:
        opts["dropout"] = ckpt.config.dropout
    return opts


def _arch_text(key: str, value) -> str:
    if key == "tie":
        return "tied weights" if value else "untied weights"
    if key == "classes":
        return plural(value, "class") if value else "a full softmax"
    return f"{key} {value}"


def unknown_tokens(vocab: Vocab, paths, tokenizer: str | None, encoding: str, errors: str) -> Counter:
    """Counts of the tokens of the texts at ``paths`` that ``vocab`` does not hold, streamed."""
    from .io import corpus

    unknown: Counter = Counter()
    known = vocab.index
    for path in paths:
        if vocab.level == "char":
            for piece in corpus.iter_text(path, encoding, errors):
                for c in set(piece).difference(known):
                    unknown[c] += piece.count(c)
        else:
            for line in corpus.iter_lines(path, encoding, errors):
                unknown.update(t for t in tokenize_line(line, tokenizer) if t not in known)
    return unknown


def describe_unknown(unknown: Counter, what: str) -> str:
    top = sorted(unknown.items(), key=lambda tn: (-tn[1], tn[0]))[:SHOWN]  # ties in a fixed order
    shown = ", ".join(f"{t!r} ({n:,} {'time' if n == 1 else 'times'})" for t, n in top)
    more = f" and {len(unknown) - SHOWN:,} more" if len(unknown) > SHOWN else ""
    count = f"{len(unknown):,} {what if len(unknown) == 1 else what + 's'}"
    return f"{count} the model never saw: {shown}{more}"


def extend(ckpt, new_tokens: list, seed: int, input_scale: float = INPUT_SCALE):
    """(vocab, config, params) of ``ckpt`` with ``new_tokens`` appended (see the module
    docstring); the old rows are copied, the new ones are those of a new model."""
    old = ckpt.config
    V = old.vocab_size + len(new_tokens)
    bounds = tuple(old.class_bounds[:-1]) + (V,) if old.class_bounds else ()
    config = dataclasses.replace(old, vocab_size=V, class_bounds=bounds)
    params = init_params(config, seed, input_scale=input_scale)
    for name, a in ckpt.params.items():
        params[name][tuple(slice(0, s) for s in a.shape)] = a
    vocab = Vocab(ckpt.vocab.level, ckpt.vocab.tokens + list(new_tokens), ckpt.vocab.tokenizer)
    return vocab, config, params


class InitFrom:
    """The model a run starts from, loaded once; :meth:`prepare` gives the run's vocabulary,
    architecture and parameters for its corpus."""

    def __init__(self, path, extend_vocab: bool = False, dtype: str = "float32"):
        """``path``: a model file or a run folder (its model.npz); ``dtype``: the run's."""
        try:
            self.path = ckpt_mod.resolve(path, names=(ckpt_mod.BEST_NAME,), purpose=" to start from")
            self.ckpt = ckpt_mod.load(self.path, dtype)
        except ckpt_mod.CheckpointError as e:
            raise FineTuneError(str(e)) from None
        self.extend_vocab = extend_vocab
        self.added: list = []

    def prepare(self, cfg) -> tuple[Vocab, ModelConfig, dict]:
        """(vocab, model config, host params) for a run of ``cfg`` (a TrainConfig)."""
        ckpt = self.ckpt
        paths = [cfg.corpus] + ([cfg.val] if cfg.val else [])
        unknown = unknown_tokens(ckpt.vocab, paths, ckpt.vocab.tokenizer, cfg.encoding, cfg.errors)
        what = "character" if ckpt.vocab.level == "char" else "word"
        if unknown and not self.extend_vocab:
            raise FineTuneError(f"{cfg.corpus}: {describe_unknown(unknown, what)}; pass --extend-vocab to add them "
                                f"(new rows initialised as a new model's)")
        if ckpt.vocab.level == "word":
            unknown = Counter({t: n for t, n in unknown.items() if n >= cfg.min_count})  # rarer ones become <unk>
        vocab, config, params = ckpt.vocab, ckpt.config, ckpt.params
        if unknown:
            # Characters in code point order, words by frequency, as a new vocabulary orders them.
            new = sorted(unknown) if ckpt.vocab.level == "char" else sorted(unknown, key=lambda t: (-unknown[t], t))
            vocab, config, params = extend(ckpt, new, cfg.seed, cfg.input_scale)
            self.added = new
        config = dataclasses.replace(config, dropout=cfg.dropout)
        return vocab, config, params

    def record(self) -> dict:
        """What a run's metadata keeps of where it started."""
        h = sha256_file(self.path)
        progress = self.ckpt.meta.get("progress")
        step = progress.get("step") if isinstance(progress, dict) else None
        rec = {"path": str(self.path), "sha256": h, "step": step if isinstance(step, int) else None,
               "vocab_size": self.ckpt.config.vocab_size, "added_tokens": list(self.added)}
        return rec
