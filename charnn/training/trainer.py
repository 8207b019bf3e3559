"""The training loop: truncated BPTT over contiguous streams, with evaluation and saves at every
``eval_every`` steps, Ctrl-C as a clean stop, and data-parallel ranks in step (dist.py).

The loop's helpers each do one job and take what they need as arguments: the configuration
and resume checks (config.py, resume.py), the run folder (folder.py), the data (data.py), the
schedule and evaluation bookkeeping (schedule.py), regularisation (regularise.py), the
divergence guard (guard.py) and the ranks (ranks.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
import types
from pathlib import Path

import numpy

from .. import interrupt
from ..backend import announce_device, get_backend, to_float
from ..dist import StepSync, World
from ..io import checkpoint as ckpt_mod
from ..io.data import Batches, CorpusError
from ..memory import MemoryLimitError
from ..nn.functional import perplexity
from ..nn.optim import clip_scale, global_norm
from . import guard, ranks, schedule
from .config import Reporter, TrainConfig, TrainError
from .build import build_model, build_optimizer, check_memory, check_memory_early, device_state, model_config
from .data import evaluate, file_digest, prepare_data
from .folder import RunFolder, RunLock, checkpoint_meta
from .regularise import rank_dropout_masks, reset_some, weights_dropped
from .resume import check_resume_state, load_resumed

LN2 = math.log(2)


class Trainer:
    """One training run. Build it, then call :meth:`run`."""

    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False, reporter: Reporter | None = None,
                 overrides: dict | None = None, init=None, corpus_stream=None, announce: bool = True,
                 world: World | None = None, max_memory: int | None = None, policy=None):
        """Args:
            init: a finetune.InitFrom: start from that model's weights and vocabulary.
            corpus_stream: a binary stream (stdin): the corpus, read once into ``cfg.corpus``
                (a file in the run folder) once the folder is locked.
            announce: say on stderr which device ``--device auto`` chose.
            world: the data-parallel ranks (dist.py); default one process. Rank 0 locks the
                folder, builds the token cache, writes and reports; all train their streams.
            max_memory: the bytes this process may use (--max-memory; default: what is available).
            policy: a policy.Policy: choose the model's size and regularisation from the corpus
                and the budget (a new character-level run on one process; policy.py).
        """
        self.cfg, self.out, self.reporter = cfg, Path(out), reporter or Reporter()
        self.folder = RunFolder(self.out)
        self.world = world or World()
        self.resume = resume
        self.overrides = overrides or {}
        self.stop_requested = False  # (data-parallel: once every rank has heard of the request)
        self.interrupted_here = False  # SIGINT seen by this process
        self.time_up = False  # data-parallel: some rank's --time-limit ran out
        self._said_stale = False  # the overfitting note is said once per process
        self.shared = {}  # data-parallel: what rank 0 found, so the others need not read it again
        self.sync = None
        self.saved_step = None  # the step of the checkpoint on disk
        self.elapsed_before = 0.0  # seconds of the runs this one resumes
        self.started = time.perf_counter()
        self.init, self.corpus_stream, self.announce, self.max_memory = init, corpus_stream, announce, max_memory
        self.init_record = None
        self.policy, self.policy_record = policy, None

    # ----- setup -----
    def _setup(self):
        saved = None
        if self.resume:
            saved, self.cfg = load_resumed(self.folder, self.overrides, check_files=self.world.root)
            self.init_record = saved.meta.get("init_from")
            self.policy_record = saved.meta.get("policy")
        else:
            self.folder.check_fresh()
        cfg = self.cfg
        if cfg.batch_size % self.world.size:
            raise TrainError(f"--batch-size {cfg.batch_size} cannot be shared by {self.world.size} processes "
                             f"(each trains an equal share of the streams); use a multiple of {self.world.size}")
        hint = self.shared
        digest = saved.meta.get("corpus_sha256") if saved else hint.get("digest")
        vocab, start_config, start_params = (saved.vocab if saved else hint.get("vocab")), None, None
        streams = max(1, cfg.batch_size // self.world.size)
        check_memory_early(cfg, saved, vocab, self.init is not None, streams, self.max_memory)
        if self.init is not None:
            vocab, start_config, start_params = self.init.prepare(cfg)
            self.init_record = self.init.record()
        vocab, train_ids, val_ids = prepare_data(cfg, vocab, self.out, digest)
        choosing = self.policy is not None and not saved and self.init is None and self.world.size == 1 \
            and cfg.level == "char"
        # Announced once the inputs are known to be good (a missing corpus is said first), and
        # after the policy's choice, which is the run's first line.
        self.backend = get_backend(cfg.device, cfg.dtype, announce=self.announce and not choosing)
        self.vocab = vocab
        try:
            self.batches = Batches(train_ids, cfg.batch_size, cfg.seq_len, part=self.world.part(cfg.batch_size))
        except CorpusError as e:
            raise CorpusError(f"{cfg.corpus}: {e}") from None
        if choosing:
            cfg = self.cfg = self._choose(cfg, len(vocab), len(train_ids), streams)
        self.val_ids = val_ids
        self.corpus_digest = saved.meta.get("corpus_sha256") if saved else digest or file_digest(cfg.corpus)
        self.val_digest = hint["val_digest"] if "val_digest" in hint else file_digest(cfg.val) if cfg.val else None
        mcfg = model_config(cfg, len(vocab), train_ids, saved, start_config)
        check_memory(cfg, mcfg, streams, self.max_memory, host_only=self.backend.device != "cpu")
        self.model = build_model(cfg, mcfg, saved, start_params, self.backend)
        self.opt = build_optimizer(cfg, self.model)
        self.rng = numpy.random.default_rng(cfg.seed)
        # How far the run has come and its best so far; the model files keep it as "progress".
        self.counters = {"step": 0, "epoch": 0, "chunk": 0, "tokens": 0, "train_seconds": 0.0, "lr": self.opt.lr,
                         "best_val": None, "best_saved": None, "bad_evals": 0, "last_train_loss": None, "last_val": None}
        self.state = None
        if saved:
            self._restore(saved)
        self.state = self.model.initial_state(self._local_n()) if self.state is None else self.state
        if self.world.size > 1:
            self.sync = StepSync(self.world.reducer(self.backend.xp), self.model.params, n_flags=3)

    def _choose(self, cfg: TrainConfig, vocab_size: int, train_tokens: int, streams: int) -> TrainConfig:
        """The options with the policy's model (policy.py), said on the reporter and recorded."""
        from . import policy

        def fits(hidden: int) -> bool:
            trial = dataclasses.replace(cfg, layers=policy.LAYERS, hidden=hidden)
            try:
                check_memory(trial, trial.model_config(vocab_size), streams, self.max_memory,
                             host_only=self.backend.device != "cpu")
            except MemoryLimitError:
                return False
            return True

        x, y = self.batches.chunk(0)
        timer = self.policy.timer(cfg, vocab_size, self.backend, x, y)
        budget = policy.Budget(cfg.time_limit, cfg.max_steps, cfg.max_epochs)
        choice = policy.choose(train_tokens, cfg.batch_size * cfg.seq_len, vocab_size, budget,
                               lambda h: dataclasses.replace(cfg, layers=policy.LAYERS, hidden=h)
                               .model_config(vocab_size).n_params(),
                               timer, fits, cell=cfg.cell, adam=cfg.optimizer == "adam")
        self.policy_record = choice.record()
        self.reporter.message(choice.line())
        if self.announce:
            announce_device(cfg.device, self.backend.device)
        return choice.apply(cfg)

    def _restore(self, saved):
        """The counters, optimizer state, random generator and this process's streams' carried
        state from a checked checkpoint."""
        check_resume_state(self.folder.last, saved, self.cfg, len(self.batches), self.opt)
        p = self.counters
        p.update(saved.meta["progress"])
        # Files saved before "elapsed" was kept: their compute time is the closest count.
        self.elapsed_before = p.pop("elapsed", p["train_seconds"])
        if "best_saved" not in saved.meta["progress"]:
            p["best_saved"] = p["best_val"]
        self.opt.load_state_arrays(saved.optim, p["opt_t"])
        self.rng.bit_generator.state = saved.meta["rng"]
        if saved.state is not None:
            self.state = device_state(saved.state, self.batches.part, self.backend)

    def _local_n(self) -> int:
        return self.batches.part[1] - self.batches.part[0]

    def _shared_setup(self) -> dict:
        """What rank 0's setup found that the other ranks would otherwise read the corpus for."""
        return {"vocab": self.vocab, "digest": self.corpus_digest, "val_digest": self.val_digest}

    # ----- checkpoints -----
    def _checkpoint(self, resumable: bool, state=None) -> ckpt_mod.Checkpoint:
        """The model with the run's metadata; ``resumable``: with the optimizer state and the
        carried state of all N streams on the host (``state``; default this process's, which
        holds them all outside data-parallel training), as last.npz holds them."""
        meta = checkpoint_meta(self.cfg, dict(self.counters, opt_t=self.opt.t, elapsed=self._elapsed()),
                               self.rng.bit_generator.state, self.corpus_digest, self.val_digest, self.init_record,
                               self.policy_record)
        if not resumable:
            return ckpt_mod.Checkpoint(self.model.config, self.vocab, self.model.host_params(), meta)
        return ckpt_mod.Checkpoint(self.model.config, self.vocab, self.model.host_params(), meta,
                                   self.opt.state_arrays(), ranks.host_state(self.state) if state is None else state)

    def save_last(self, state=None):
        ckpt_mod.save(self.folder.last, self._checkpoint(True, state))

    def save_best(self):
        ckpt_mod.save(self.folder.best, self._checkpoint(False))

    def _save(self, best: bool):
        """Save last.npz, and model.npz when ``best`` (RunFolder.save's order); data-parallel, rank
        0 writes all streams' state once every rank is found to hold the same parameters."""
        ranks.check_same_params(self.world, self.model.params, self.counters["step"])
        state = ranks.all_state(self.world, self.state)
        ranks.together(self.world, lambda: self.folder.save(best, lambda: self.save_last(state), self.save_best),
                       root_only=True)
        self.saved_step = self.counters["step"]

    def _check_model(self, loss: float, what: str):
        """Raise guard.Diverged unless the model may be saved (see guard.py)."""
        def check():
            self._check_loss(loss, what)
            groups = [("parameter", self.model.params.items()), ("optimizer state", self.opt.state.items()),
                      ("hidden state", ((f"{layer}/{k}", a) for layer, hc in enumerate(self.state)
                                        for k, a in zip("hc", hc) if a is not None))]
            why = guard.first_non_finite(groups, self.backend.xp)
            if why:
                raise self._diverged(why)

        ranks.together(self.world, check)  # (each rank checks its own streams' state)

    def _check_loss(self, loss: float, what: str):
        why = guard.loss_problem(loss, what, len(self.vocab))
        if why:
            raise self._diverged(why)

    def _diverged(self, why: str):
        return guard.diverged(self.counters["step"], why, self.saved_step, self.out)

    def _train_sample_loss(self) -> float:
        """The model's loss on the first chunk of the training text (N x T predictions, a cold
        start, no dropout): what a save without validation data checks the model by."""
        b = self.batches
        return evaluate(self.model, b.streams.reshape(-1)[: b.N * b.T + 1], b.N, b.T, self.world)

    def _elapsed(self) -> float:
        """Seconds of the whole run: this process's, and those of the runs it resumed."""
        return self.elapsed_before + time.perf_counter() - self.started

    def _metric(self, m: dict):
        ranks.together(self.world, lambda: self.folder.append_metric(m), root_only=True)

    def evaluate_and_save(self, sample: bool = True, scheduled: bool = True):
        """Evaluate, save model.npz if the model is the best so far, and last.npz (a model that
        fails the guard raises Diverged, nothing written); ``sample``: show one; ``scheduled``:
        one of the eval_every schedule (schedule.record_evaluation)."""
        p, cfg = self.counters, self.cfg
        if self.val_ids is None:
            self._check_model(self._train_sample_loss(), "training loss")
            self._save(best=True)
            return None
        val = evaluate(self.model, self.val_ids, cfg.batch_size, cfg.seq_len, self.world)
        self._check_model(val, "validation loss")
        improved = schedule.record_evaluation(p, val, cfg, scheduled, self.folder.best.exists())
        m = {"type": "eval", "step": p["step"], "epoch": p["epoch"] + p["chunk"] / len(self.batches),
             "tokens": p["tokens"], "elapsed": self._elapsed(), "val_loss": val, "val_bits_per_token": val / LN2,
             "val_perplexity": perplexity(val), "best_val_loss": p["best_saved"], "best_step": p.get("best_step"),
             "lr": p["lr"] * self.lr_factor()}  # the rate of the next step
        self._metric(m)
        text = None
        if sample and cfg.sample_length > 0 and self.world.root:
            from ..sample import generate

            text = "".join(generate(self.model, self.vocab, cfg.sample_length, temperature=0.8,
                                    rng=numpy.random.default_rng(p["step"])))
        self._save(best=improved)
        self.reporter.evaluation(m, text)
        note = schedule.stale_note(cfg, p) if scheduled and not self._said_stale else None
        if note:
            self._said_stale = True
            self.reporter.message(note)
        return val

    # ----- the run -----
    def run(self) -> dict:
        """Lock the folder, set up and train. Data-parallel, rank 0 alone locks the folder (for
        the whole run) and builds the token cache, while the others wait; then they set up from
        what it found (the vocabulary, the digests: no rank reads the corpus again) and map
        the same cache. An error of either stage is agreed on, so every rank leaves."""
        with contextlib.ExitStack() as held:
            ranks.set_up(self.world, lambda: self._setup_locked(held), self._setup_from, self._shared_setup)
            if self.world.root:
                self.folder.remove_stale_temp_files()
            return self._loop()

    def _setup_from(self, shared: dict):  # (data-parallel: the ranks but 0, from what rank 0 found)
        self.shared = shared
        self._setup()

    def _setup_locked(self, held: contextlib.ExitStack):
        """Create and lock the run folder (the lock entered on ``held``), then set up; a setup
        that fails leaves the folder as it found it."""
        created = self.folder.create()
        before = self.folder.snapshot()
        held.enter_context(RunLock(self.out))
        stdin_copy = None
        try:
            if self.corpus_stream is not None and not self.folder.holds_run():  # (else _setup refuses the folder)
                stdin_copy = self.folder.copy_stream(self.corpus_stream, Path(self.cfg.corpus))
            self._setup()
        except BaseException:
            self.folder.undo_start(before, created, stdin_copy)
            raise

    def _reset_some(self, state: list) -> list:
        return reset_some(state, self.cfg.state_reset, self.rng, self.cfg.batch_size, self.world.part(self.cfg.batch_size))

    def _dropout_masks(self, T: int):
        """Data-parallel: this rank's columns of the whole batch's dropout masks (one process:
        None, the model draws its own)."""
        cfg = self.cfg
        if self.sync is None or cfg.dropout <= 0:
            return None
        return rank_dropout_masks(cfg.dropout, cfg.layers, (cfg.hidden, T, cfg.batch_size), self.batches.part, self.rng,
                                  self.backend.xp, self.backend.dtype)

    def _step(self, x, y, started: float):
        """One training step: loss and gradients of this process's streams, then (data-parallel)
        their sum over the ranks with the stop and time-up flags in the same Allreduce, then
        the update. Returns the loss, the mean over the whole batch."""
        cfg, model, p = self.cfg, self.model, self.counters
        with weights_dropped(model.params, cfg.layers, cfg.weight_drop, self.rng, self.backend.xp,
                             self.backend.dtype) as masks:
            loss, grads, self.state = model.loss_and_grads(x, y, self.state, rng=self.rng, sparse=True,
                                                           dropout_masks=self._dropout_masks(x.shape[0]))
        for name, mask in masks.items():  # d loss / d Wh = (d loss / d (Wh * mask)) * mask
            grads[name] *= mask
            grads.changed(name)
        self.state = self._reset_some(self.state)
        if self.sync is None:
            self.opt.lr = p["lr"] * self.lr_factor()
            self.opt.step(grads, clip_scale(global_norm(grads, model.ops), cfg.clip))
            return loss
        time_up = cfg.time_limit is not None and time.perf_counter() - started >= cfg.time_limit
        # Rank 0's clock rides along (the others add 0), so a schedule over time gives every
        # rank the same rate.
        clock = self._elapsed() if self.world.root else 0.0
        grads, loss, (stops, time_ups, clock) = self.sync.reduce(
            grads, loss, (float(self.interrupted_here), float(time_up), clock))
        self.stop_requested, self.time_up = stops > 0, time_ups > 0
        self.opt.lr = p["lr"] * self.lr_factor(float(clock))
        ranks.mean_update(self.opt, grads, model.ops, cfg.clip, self.world.size, self.backend.xp)
        return loss / self.world.size

    def _done(self, started: float) -> str | None:
        out_of_time = self.cfg.time_limit is not None and (
            self.time_up if self.sync else time.perf_counter() - started >= self.cfg.time_limit)
        reason = schedule.limit_reached(self.cfg, self.counters, out_of_time)
        return reason or ("interrupted" if self.stop_requested else None)

    def lr_factor(self, elapsed: float | None = None) -> float:
        """The schedule's factor for the next step; ``elapsed``: the ranks' agreed clock."""
        p = self.counters
        horizon = p.get("horizon_seconds")
        if horizon and elapsed is None and self.cfg.lr_schedule == "cosine":
            elapsed = self._elapsed()
        epochs = p["epoch"] + p["chunk"] / max(len(self.batches), 1)
        return schedule.rate_factor(self.cfg, p["step"], epochs, elapsed, horizon)

    def _loop(self) -> dict:
        cfg, p, model, batches = self.cfg, self.counters, self.model, self.batches
        ranks.together(self.world, lambda: self.folder.trim_metrics(p["step"]), root_only=True)
        self.saved_step = p["step"] if self.resume else None
        started = self.started = time.perf_counter()
        if cfg.time_limit is not None and (p.get("horizon_seconds") or 0.0) <= self.elapsed_before:
            p["horizon_seconds"] = self.elapsed_before + cfg.time_limit  # (see schedule.py)
        self.reporter.start({"vocab_size": len(self.vocab), "params": model.config.n_params(),
                             "train_tokens": len(batches.streams.reshape(-1)), "chunks_per_epoch": len(batches),
                             "val_tokens": 0 if self.val_ids is None else len(self.val_ids), "step": p["step"],
                             "device": self.backend.name, "config": cfg, "out": str(self.out)})
        window = LogWindow(self.backend.xp)
        reason = None
        with ctrl_c_stops(self) as ctrl_c:  # from the first step to the last save
            while True:
                reason = self._done(started)
                if reason:
                    break
                if p["chunk"] >= len(batches):
                    p["epoch"] += 1
                    p["chunk"] = 0
                    self.state = model.initial_state(self._local_n())
                    continue
                t0 = time.perf_counter()
                x, y = batches.chunk(p["chunk"])
                loss = self._step(x, y, started)
                tokens = y.shape[0] * cfg.batch_size  # of all the ranks
                window.add(loss, tokens, time.perf_counter() - t0)
                p["chunk"] += 1
                p["step"] += 1
                p["tokens"] += tokens
                if window.n >= cfg.log_every or p["step"] == cfg.max_steps:
                    train_loss = self._close(window)
                    m = {"type": "train", "step": p["step"], "epoch": p["epoch"] + p["chunk"] / len(batches),
                         "train_loss": train_loss, "tokens": p["tokens"],
                         "tokens_per_second": window.tokens / max(window.seconds, 1e-9), "lr": self.opt.lr,
                         "elapsed": self._elapsed()}
                    self._metric(m)
                    self.reporter.log(m)
                    window.clear()
                if cfg.eval_every and p["step"] % cfg.eval_every == 0:
                    self.evaluate_and_save()
                    if schedule.stop_early(cfg, p):
                        reason = "early_stopping"
                        break
            # A Ctrl-C from here on lets the final evaluation and save finish: no step is lost.
            ctrl_c.message = "finishing the final evaluation and saving (Ctrl-C again to abort)"
            if window.n:
                self._close(window)
            if reason == "interrupted":
                self._check_model(self._train_sample_loss(), "training loss")
                state = ranks.all_state(self.world, self.state)
                ranks.together(self.world, lambda: self.save_last(state), root_only=True)
            elif not (cfg.eval_every and p["step"] % cfg.eval_every == 0 and p["step"] > 0):
                # Stopped between scheduled evaluations (early stopping always stops right after one).
                self.evaluate_and_save(sample=False, scheduled=False)
        if self.interrupted_here:
            reason = "interrupted"  # (Ctrl-C after the last step: all saved, and said so, exit 130)
        self.reporter.end()
        return self.result(reason)

    def _close(self, window: "LogWindow") -> float:
        """Account the steps of ``window``: their mean training loss, checked by the guard."""
        train_loss = to_float(window.loss) / window.n
        ranks.together(self.world, lambda: self._check_loss(train_loss, "training loss"))
        self.counters["train_seconds"] += window.seconds
        self.counters["last_train_loss"] = train_loss
        return train_loss

    def result(self, reason: str | None) -> dict:
        return summary(reason, self.counters, self.folder, len(self.batches))


def summary(reason: str | None, counters: dict, folder: RunFolder, chunks: int) -> dict:
    """The run's summary (the command's --json): where the models are, why it stopped, the
    steps, tokens and speed, the last and best losses."""
    p = counters
    val = p.get("last_val")
    return {
        "model": str(folder.best if folder.best.exists() else folder.last),
        "checkpoint": str(folder.last),
        "stopped": reason,
        "steps": p["step"], "epochs": p["epoch"] + p["chunk"] / max(chunks, 1),
        "tokens": p["tokens"], "train_seconds": p["train_seconds"],
        "tokens_per_second": p["tokens"] / p["train_seconds"] if p["train_seconds"] else 0.0,
        "train_loss": p.get("last_train_loss"),
        "val_loss": val, "val_bits_per_token": None if val is None else val / LN2,
        "val_perplexity": None if val is None else perplexity(val),
        "best_val_loss": p.get("best_saved"),
        "best_step": p.get("best_step"),
        "best_train_seconds": p.get("best_seconds"),
    }


@contextlib.contextmanager
def ctrl_c_stops(trainer: "Trainer"):
    """Inside, a first Ctrl-C asks the run to stop after the current step (and save a
    checkpoint); a second one stops at once (KeyboardInterrupt). Data-parallel, the request
    reaches every rank with the next step's Allreduce. Yields an object whose ``message`` is
    what a first Ctrl-C says."""
    interrupt.check()  # a Ctrl-C the setup's imports swallowed: no step is taken
    previous = signal.getsignal(signal.SIGINT)
    said = types.SimpleNamespace(message="stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def on_sigint(signum, frame):
        if trainer.interrupted_here:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        trainer.interrupted_here = True
        if trainer.sync is None:
            trainer.stop_requested = True
        trainer.reporter.message(said.message)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield said
    finally:
        signal.signal(signal.SIGINT, previous)


class LogWindow:
    """The steps since the last progress line: their summed loss (on the device, read once a
    line), count, tokens and seconds."""

    def __init__(self, xp):
        self.loss = xp.zeros((), dtype=numpy.float64)
        self.n, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, loss, tokens: int, seconds: float):
        self.loss += loss
        self.n += 1
        self.tokens += tokens
        self.seconds += seconds

    def clear(self):
        self.loss[...] = 0
        self.n, self.tokens, self.seconds = 0, 0, 0.0
