"""`charnn train --config FILE`: TOML values become defaults; the command line overrides them."""

from click.testing import CliRunner

from charnn.io.checkpoint import load
from charnn.cli import cli


def test_config_file_values_and_overrides(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat.\n" * 60, encoding="utf-8")
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nhidden = 16\nlayers = 1\nseq-len = 8\nbatch_size = 4\nmax-steps = 3\neval_every = 3\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", str(corpus), "--config", str(cfg), "--hidden", "12", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    ckpt = load(out / "model.npz")
    assert ckpt.config.hidden == 12  # the command line wins
    assert ckpt.config.layers == 1 and ckpt.meta["train"]["seq_len"] == 8 and ckpt.meta["progress"]["step"] == 3


def test_config_file_errors_are_usage_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc\n" * 10, encoding="utf-8")
    for text, needle in (("[train]\nbogus = 1\n", "unknown option 'bogus'"), ("hidden = [", "not valid TOML")):
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        r = CliRunner().invoke(cli, ["train", str(corpus), "--config", str(cfg)])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["train", str(corpus), "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "cannot read" in r.output
