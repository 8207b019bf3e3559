"""The model chosen from the corpus and the budget (training/policy.py): the choice for given
tokens, budgets and speeds (a fake timer: never a real timing), the run's first line, the model
file's record, and the options, config files and resumes that keep the user in charge."""

from __future__ import annotations

import json

import pytest

from charnn.io import checkpoint
from charnn.nn.model import ModelConfig
from charnn.training import policy
from charnn.training.policy import Budget, choose, dropout_for

from cli_support import check_error, check_ok, corpus_text, invoke, readme_words, stop_after, write_corpus

V = 65
# Fake seconds a step (batch 32 x seq 50 = 1,600 tokens): larger is slower, as on a machine.
SECONDS = {128: 0.02, 192: 0.04, 256: 0.08, 384: 0.15, 512: 0.2, 768: 0.45}


def params(hidden: int) -> int:
    return ModelConfig(vocab_size=V, cell="lstm", layers=2, hidden=hidden).n_params()


class Timer:
    """A fake step timer: SECONDS, and the sizes asked."""

    def __init__(self, table=SECONDS):
        self.table, self.asked = table, []

    def __call__(self, hidden):
        self.asked.append(hidden)
        return self.table[hidden]


def test_params_of_the_ladder():  # the figures the rule's comments quote
    assert params(256) == 871_745 and params(512) == 3_316_289 and params(768) == 7_333_697


@pytest.mark.parametrize("tokens, budget, hidden, dropout, decay, binding, asked", [
    # tiny Shakespeare's 1.0 M, 15 minutes: 2x512 gets 4,275 steps, 6.8 epochs; 2x768 gets
    # 3.0 epochs and 0.4 tokens a parameter, under both of the rule's floors.
    (1_003_854, Budget(time_limit=900), 512, 0.4, 0.1, "time_limit", [256, 512, 768]),
    # 4.4 M tokens (the quick start's corpus), 15 minutes: 2x384 gets 2.1 epochs and 4.8
    # tokens a parameter, just under; 2x256 gets 3.9 epochs and 19.7 tokens a parameter.
    (4_365_000, Budget(time_limit=900), 256, 0.0, 0.0, "time_limit", [256, 384, 512]),
    # 310 k tokens, 5 minutes: many epochs for any size; 2x768 has more than 20 parameters a
    # training token, so it is never measured; 2x512 runs 7.4 epochs.
    (310_000, Budget(time_limit=300), 512, 0.4, 0.1, "time_limit", [256, 512]),
    # a step budget needs no timing: 3.2 M tokens are 3.2 epochs, 3.7 tokens a parameter of
    # 2x256 (under 4 and 5), 5.7 of 2x192.
    (1_003_854, Budget(max_steps=2000), 192, 0.0, 0.0, "max_steps", []),
    # an epoch budget gives every size its epochs: the largest the corpus allows.
    (1_003_854, Budget(max_epochs=10), 768, 0.45, 0.1, "max_epochs", []),
    # both: the steps bind before the time (4.8 epochs for any size).
    (1_003_854, Budget(time_limit=3600, max_steps=3000), 768, 0.15, 0.1, "max_steps", [256, 512, 768]),
    # a corpus smaller than any candidate allows: the smallest, at EPOCH_CAP epochs (not 2,280).
    (10_000, Budget(time_limit=300), 128, dropout_for(policy.EPOCH_CAP), 0.1, "time_limit", [128]),
])
def test_the_choice(tokens, budget, hidden, dropout, decay, binding, asked):
    timer = Timer()
    c = choose(tokens, 1600, V, budget, params, timer)
    assert (c.layers, c.hidden, c.dropout, c.weight_decay, c.binding) == (2, hidden, dropout, decay, binding)
    assert sorted(timer.asked) == asked
    assert c.kept is None and c.epochs > 0


def test_a_slower_machine_chooses_a_smaller_model():
    fast = choose(1_003_854, 1600, V, Budget(time_limit=900), params, Timer())
    slow = choose(1_003_854, 1600, V, Budget(time_limit=900), params, Timer({h: 2 * s for h, s in SECONDS.items()}))
    assert (fast.hidden, slow.hidden) == (512, 384)
    assert "2x512: 3.4 epochs and 1.0 tokens a parameter in the budget, under 4 and 5" in slow.line()


def test_a_time_limit_that_buys_too_many_epochs_is_cut_to_the_cap():
    """310 k tokens for 15 minutes: 2x512 would run 4,275 steps, 22.1 epochs; it gets
    EPOCH_CAP, dropout for them, and the run's --max-epochs; its line says so."""
    cap = policy.EPOCH_CAP
    c = choose(310_000, 1600, V, Budget(time_limit=900), params, Timer())
    assert (c.hidden, c.max_epochs, c.epochs, c.dropout) == (512, cap, pytest.approx(cap), dropout_for(cap))
    assert c.allowed == pytest.approx(4275 * 1600 / 310_000)
    assert f"15 minutes: {cap} epochs and then it stops: 15 minutes would allow 22.1, and more passes" in c.line()
    assert c.line().endswith("--dropout, --weight-decay or --max-epochs choose yourself")
    assert c.record()["from"]["epoch_cap"] == cap and c.record()["from"]["allowed_epochs"] == c.allowed

    from charnn.train import TrainConfig

    cfg = c.apply(TrainConfig(corpus="c", time_limit=900))
    assert (cfg.hidden, cfg.max_epochs, cfg.time_limit) == (512, cap, 900)
    # a budget of epochs or steps is the user's demand: kept, however many epochs
    for budget in (Budget(max_epochs=30), Budget(max_steps=6000), Budget(time_limit=900, max_epochs=30)):
        c = choose(310_000, 1600, V, budget, params, Timer())
        assert c.max_epochs is None and c.allowed is None and c.epochs > cap and "stops" not in c.line()
        assert c.apply(TrainConfig(corpus="c", max_epochs=budget.max_epochs)).max_epochs == budget.max_epochs
    # under the cap, nothing changes
    c = choose(310_000, 1600, V, Budget(time_limit=300), params, Timer())
    assert c.max_epochs is None and c.epochs < cap and c.line().endswith("--dropout or --weight-decay choose yourself")


def test_no_weight_decay_without_adam():
    assert choose(310_000, 1600, V, Budget(time_limit=300), params, Timer(), adam=False).weight_decay == 0.0


def test_memory_rules_out_a_candidate():
    c = choose(1_003_854, 1600, V, Budget(time_limit=900), params, Timer(), fits=lambda h: h < 512)
    assert c.hidden == 384 and "memory" in c.line()


def test_short_time_limits_and_unmeasured_candidates_keep_the_defaults():
    timer = Timer()
    c = choose(1_003_854, 1600, V, Budget(time_limit=30), params, timer)
    assert (c.hidden, c.layers, c.dropout, c.weight_decay) == (256, 2, 0.0, 0.0) and timer.asked == []
    assert "too short" in c.line() and c.record()["kept"]
    assert choose(1_003_854, 1600, V, Budget(), params, timer).kept.startswith("no --time-limit")
    c = choose(1_003_854, 1600, V, Budget(time_limit=900), params, lambda h: None)
    assert c.hidden == 256 and c.kept == "no candidate could be measured"


def test_dropout_grows_with_epochs():
    assert [dropout_for(e) for e in (0.5, 2, 3, 4, 6, 8, 16, 100)] == [0.0, 0.0, 0.0, 0.0, 0.3, 0.4, 0.5, 0.5]


def test_the_line_and_the_record():
    c = choose(1_003_854, 1600, V, Budget(time_limit=900), params, Timer())
    assert c.line().startswith("charnn: lstm 2x512, dropout 0.4, weight decay 0.1, chosen for 1.0 M training "
                               "tokens and 15 minutes: about 6.8 epochs (2x768: 3.0 epochs and 0.4 tokens a "
                               "parameter in the budget, under 4 and 5)")
    r = c.record()
    assert r["chose"] == {"cell": "lstm", "layers": 2, "hidden": 512, "dropout": 0.4, "weight_decay": 0.1}
    assert r["from"]["train_tokens"] == 1_003_854 and r["from"]["time_limit"] == 900 and r["from"]["vocab_size"] == V
    assert r["from"]["seconds_per_step"] == {"256": 0.08, "512": 0.2, "768": 0.45} and r["line"] == c.line(hint=False)


def test_the_step_timer_stops_at_its_budget():
    """StepTimer on a real tiny chunk with a fake clock (each reading 0.4 s later): the first
    size's two timed steps spend its 0.75 s, the next size is not measured."""
    import numpy

    from charnn.backend import get_backend
    from charnn.train import TrainConfig

    ticks = iter(numpy.arange(0, 100, 0.4))
    rng = numpy.random.default_rng(0)
    x, y = rng.integers(0, 7, (4, 2)), rng.integers(0, 7, (4, 2))
    timer = policy.StepTimer(TrainConfig(corpus="c", device="cpu"), 7, get_backend("cpu"), x, y, budget=0.75,
                             clock=lambda: float(next(ticks)))
    assert [timer(8), timer(12)] == [pytest.approx(0.4), None] and timer.spent == pytest.approx(0.8)


# ----- the command line -----

@pytest.fixture
def on(monkeypatch):
    monkeypatch.setenv("CHARNN_POLICY", "1")  # (the suite turns it off: conftest.py)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """About 156 k characters: 140 k training tokens, enough for 2x384 (1.8 M parameters) under
    20 a token, not for 2x512."""
    path = tmp_path_factory.mktemp("policy") / "big.txt"
    path.write_text(corpus_text(6500, seed=3), encoding="utf-8")
    return path


SMALL_STEPS = ["--seq-len", "8", "--batch-size", "4", "--device", "cpu", "--sample-length", "0"]


def first_line(result) -> str:
    return result.stderr.splitlines()[0]


def test_a_run_says_and_records_its_choice(tmp_path, on, big, monkeypatch):
    stop_after(monkeypatch, 2)
    r = invoke("train", big, "--out", tmp_path / "run", "--max-epochs", 10, *SMALL_STEPS)
    assert r.exit_code == 130, r.output
    assert first_line(r).startswith("charnn: lstm 2x384, dropout 0.45, weight decay 0.1, chosen for 0.1 M training "
                                    "tokens and 10 epochs: about 10.0 epochs (2x512: 3.2 M parameters, more than 20"), r.stderr
    assert "choose yourself" in first_line(r)
    assert r.stderr.splitlines()[1].startswith("charnn train: lstm 2x384")
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert (last.config.layers, last.config.hidden, last.config.dropout) == (2, 384, 0.45)
    assert last.meta["train"]["weight_decay"] == 0.1
    record = last.meta["policy"]
    assert record["chose"]["hidden"] == 384 and record["from"]["max_epochs"] == 10 and record["from"]["steps"] > 0
    info = check_ok(invoke("info", tmp_path / "run" / "last.npz")).output
    assert "policy        lstm 2x384, dropout 0.45, weight decay 0.1, chosen for" in info
    as_json = json.loads(check_ok(invoke("info", tmp_path / "run" / "last.npz", "--json")).output)
    assert as_json["policy"] == record["line"] and not record["line"].startswith("charnn:")
    # a resume keeps the recorded model and its record, and chooses nothing
    r = check_ok(invoke("train", "--resume", "--out", tmp_path / "run", "--max-steps", 4, "-q"))
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert (last.config.hidden, last.config.dropout, last.meta["progress"]["step"]) == (384, 0.45, 4)
    assert last.meta["policy"] == record and "chosen" not in r.stderr


def test_a_time_limit_measures_each_size(tmp_path, on, big, monkeypatch):
    asked = []

    class FakeTimer:
        def __init__(self, cfg, vocab_size, backend, x, y):
            assert x.shape == (16, 16) and vocab_size == 19

        def __call__(self, hidden):
            asked.append(hidden)
            return SECONDS[hidden]

    monkeypatch.setattr(policy, "StepTimer", FakeTimer)
    stop_after(monkeypatch, 1)
    r = invoke("train", big, "--out", tmp_path / "run", "--time-limit", 600, "--seq-len", 16, "--batch-size", 16,
               "--device", "cpu", "--sample-length", 0)
    assert r.exit_code == 130, r.output
    # 2x384: 3,800 steps of 256 tokens, 7.1 epochs of 137,792 tokens
    assert first_line(r).startswith("charnn: lstm 2x384, dropout 0.4, weight decay 0.1, chosen for 0.1 M training "
                                    "tokens and 10 minutes: about 7.1 epochs"), r.stderr
    assert sorted(asked) == [256, 384]  # 2x512 is too large for the corpus: not measured
    seconds = checkpoint.load(tmp_path / "run" / "last.npz").meta["policy"]["from"]["seconds_per_step"]
    assert seconds == {"256": 0.08, "384": 0.15}


def test_a_long_time_limit_on_a_small_corpus_ends_at_the_cap(tmp_path, on, big, monkeypatch):
    """30 minutes of 2x384 would be 21.2 epochs of this corpus: the run gets --max-epochs
    EPOCH_CAP in its saved options (so a resume keeps it) and its line says so."""
    monkeypatch.setattr(policy, "StepTimer", lambda *a: SECONDS.get)
    stop_after(monkeypatch, 1)
    r = invoke("train", big, "--out", tmp_path / "run", "--time-limit", 1800, "--seq-len", 16, "--batch-size", 16,
               "--device", "cpu", "--sample-length", 0)
    assert r.exit_code == 130, r.output
    assert f"30 minutes: {policy.EPOCH_CAP} epochs and then it stops: 30 minutes would allow 21.2" in first_line(r)
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert (last.config.hidden, last.meta["train"]["max_epochs"], last.meta["train"]["time_limit"]) == \
        (384, policy.EPOCH_CAP, 1800)
    assert last.meta["policy"]["from"]["epoch_cap"] == policy.EPOCH_CAP


def test_a_run_ended_by_the_cap_says_so_at_the_end(tmp_path, on, monkeypatch):
    """A tiny corpus and a minute: the fake timer allows thousands of epochs, the run stops at
    EPOCH_CAP and its closing line says why, before the minute is up."""
    monkeypatch.setattr(policy, "StepTimer", lambda *a: SECONDS.get)
    corpus = write_corpus(tmp_path, lines=30)
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "run", "--time-limit", 60, *SMALL_STEPS))
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert last.meta["progress"]["epoch"] == policy.EPOCH_CAP
    assert f"it stopped at the {policy.EPOCH_CAP} epochs chosen for this corpus" in r.stderr.splitlines()[-1]
    assert "s of training, of the 60 s allowed (more passes would overfit)" in r.stderr.splitlines()[-1]
    # resumed with a --max-epochs of the user's, the end is theirs, not the policy's
    r = check_ok(invoke("train", "--resume", "--out", tmp_path / "run", "--max-epochs", policy.EPOCH_CAP + 1))
    assert checkpoint.load(tmp_path / "run" / "last.npz").meta["progress"]["epoch"] == policy.EPOCH_CAP + 1
    assert "chosen for this corpus" not in r.stderr


def test_the_help_states_the_cap():
    """train --help and the README give EPOCH_CAP's value (policy.py holds it)."""
    cap = policy.EPOCH_CAP
    helped = "".join(invoke("train", "--help").output.split())  # (click may wrap after a hyphen)
    assert f"morethan{cap}epochsgets--max-epochs{cap}" in helped
    assert f"more than {cap} epochs gets `--max-epochs {cap}`" in readme_words()


def test_the_help_and_readme_state_the_rule():
    """train --help and the README give the size rule's constants and the dropout curve as
    policy.py holds them (they are written out in both texts)."""
    n = lambda x: f"{x:g}"  # noqa: E731
    helped = " ".join(invoke("train", "--help").output.split())
    assert (f"runs {n(policy.EPOCHS)} epochs or sees {n(policy.TOKENS_PER_PARAM)} tokens a parameter within the "
            f"budget and has at most {n(policy.PARAMS_PER_TOKEN)} parameters a training token") in helped
    readme = readme_words()
    (e0, d0), (e1, d1), (e2, d2) = policy.DROPOUT
    assert d0 == 0
    assert (f"runs at least {n(policy.EPOCHS)} epochs or sees at least {n(policy.TOKENS_PER_PARAM)} training "
            f"tokens a parameter") in readme
    assert f"at most {n(policy.PARAMS_PER_TOKEN)} parameters a training token" in readme
    assert (f"(none up to {n(e0)}, {n(d1)} at {n(e1)}, {n(d2)} from {n(e2)}) and AdamW's {n(policy.WEIGHT_DECAY)} "
            f"from {n(policy.DECAY_EPOCHS)} epochs") in readme


def test_quiet_says_nothing_and_still_records(tmp_path, on, big, monkeypatch):
    stop_after(monkeypatch, 1)
    r = invoke("train", big, "--out", tmp_path / "run", "--max-epochs", 10, *SMALL_STEPS, "-q")
    assert r.exit_code == 130 and "chosen" not in r.stderr
    assert checkpoint.load(tmp_path / "run" / "last.npz").meta["policy"]["chose"]["hidden"] == 384


@pytest.mark.parametrize("given", [["--hidden", "24"], ["--layers", "1"], ["--dropout", "0.1"],
                                   ["--weight-decay", "0.01"], ["--embed", "8"], ["--weight-drop", "0.1"]])
def test_any_size_option_keeps_the_user_in_charge(tmp_path, on, big, monkeypatch, given):
    stop_after(monkeypatch, 1)
    r = invoke("train", big, "--out", tmp_path / "run", "--max-epochs", 10, *SMALL_STEPS, *given)
    assert r.exit_code == 130 and "chosen" not in r.stderr
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert "policy" not in last.meta
    assert last.config.hidden == (24 if given[0] == "--hidden" else 256)
    assert last.config.layers == (1 if given[0] == "--layers" else 2)


def test_a_config_file_value_counts_as_given(tmp_path, on, big, monkeypatch):
    (tmp_path / "c.toml").write_text("[train]\nhidden = 24\n", encoding="utf-8")
    stop_after(monkeypatch, 1)
    r = invoke("train", big, "--config", tmp_path / "c.toml", "--out", tmp_path / "run", "--max-epochs", 10,
               *SMALL_STEPS)
    assert r.exit_code == 130 and "chosen" not in r.stderr
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert last.config.hidden == 24 and "policy" not in last.meta


def test_without_a_budget_the_defaults(tmp_path, on, monkeypatch):
    corpus = write_corpus(tmp_path)
    stop_after(monkeypatch, 1)
    r = invoke("train", corpus, "--out", tmp_path / "run", *SMALL_STEPS)
    assert r.exit_code == 130 and "chosen" not in r.stderr
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert (last.config.layers, last.config.hidden, last.config.dropout) == (2, 256, 0.0)
    assert "policy" not in last.meta and last.meta["train"]["max_epochs"] == 10


def test_the_default_folder_is_found_again_by_resume(tmp_path, on, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path, "c.txt")
    check_ok(invoke("train", "c.txt", "--max-steps", 2, *SMALL_STEPS, "-q"))
    folder = tmp_path / "models" / "c-lstm"
    assert checkpoint.load(folder / "last.npz").meta["policy"]["chose"]["hidden"] == 128  # the corpus is tiny
    check_ok(invoke("train", "c.txt", "--resume", "--max-steps", 3, "-q"))
    assert checkpoint.load(folder / "last.npz").meta["progress"]["step"] == 3
    # a run named by its size (given, or from before the policy) is found too
    check_ok(invoke("train", corpus, "--hidden", 256, "--max-steps", 1, *SMALL_STEPS, "-q"))
    sized = tmp_path / "models" / "c-lstm-2x256"
    import shutil

    shutil.rmtree(folder)
    check_ok(invoke("train", "c.txt", "--resume", "--max-steps", 2, "-q"))
    assert checkpoint.load(sized / "last.npz").meta["progress"]["step"] == 2


def test_a_bad_setting_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_POLICY", "yes")
    corpus = write_corpus(tmp_path)
    r = invoke("train", corpus, "--out", tmp_path / "run", "--max-steps", 1, *SMALL_STEPS)
    check_error(r, 1, "CHARNN_POLICY must be 0", "'yes'")
    assert not (tmp_path / "run").exists()


def test_off_keeps_the_defaults_and_the_old_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_POLICY", "0")
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path, "c.txt")
    check_ok(invoke("train", "c.txt", "--max-steps", 1, *SMALL_STEPS, "-q"))
    last = checkpoint.load(tmp_path / "models" / "c-lstm-2x256" / "last.npz")
    assert last.config.hidden == 256 and "policy" not in last.meta
