"""Behaviour fingerprints: does a change of code change any number charnn computes?

    python benchmarks/fingerprint.py                        # this checkout's fingerprints (JSON)
    git worktree add /tmp/charnn-old <commit>
    python benchmarks/fingerprint.py --against /tmp/charnn-old   # which arrays differ, old vs new
    python benchmarks/fingerprint.py --against /tmp/charnn-old --env CHARNN_THREADS=1

For every configuration (each registered cell, 1 and 2 layers, one-hot and embedded input, with
and without dropout, char and word level, full and class-factored softmax, float32 and float64)
it computes, from fixed seeds: the loss and gradients of a chunk, the parameters after three
Adam steps with clipping, the carried state, 40 sampled tokens (plain, top-k/top-p, greedy),
beam search, line scores and a document score; and for each cell a short training run through
the library (losses of its metrics, the saved parameters, the resumable checkpoint's progress)
with dropout, weight drop, state resets, weight decay and the cosine schedule; and dynamic
evaluation (statistics, scores, a tuning over a given grid, score --dynamic with its rates
given) of a small char and word model. Each result is
hashed (SHA-256 of its bytes), so two versions compare exactly: a refactoring that moves code
must show 0 differences. ``--against`` runs the other tree in a subprocess with its checkout
first on PYTHONPATH, under the same environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def digest(*arrays) -> str:
    import numpy

    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = numpy.ascontiguousarray(numpy.asarray(a))
        if a.dtype == object:
            raise TypeError("an object array has no stable bytes")
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def model_fingerprints(out: dict):
    import numpy

    from charnn.backend import get_backend, to_host
    from charnn.io.vocab import Vocab
    from charnn.nn import cells
    from charnn.nn.model import LanguageModel, ModelConfig
    from charnn.nn.optim import clip_scale, global_norm, make_optimizer
    from charnn.sample import beam_search, generate
    from charnn.score import score_document, score_lines

    char_vocab = Vocab.build_char("abcdefgh ijklmn.\n")
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(38)]
    word_vocab = Vocab("word", words, "whitespace")
    text = {"char": "abc def. ghi jkl\nmn a b c\nfed cba.\n",
            "word": "w1 w2 w3 w4\nw5 w6 w7 w8 w9\nw10 w11 w2 w3\n"}
    for dtype in ("float32", "float64"):
        backend = get_backend("cpu", dtype)
        for cell in sorted(cells.CELLS):
            for layers in (1, 2):
                for embed in (0, 8):
                    for dropout in (0.0, 0.3):
                        for level, classes in (("char", 0), ("word", 0), ("word", 6)):
                            if dtype == "float64" and (dropout or level == "word"):
                                continue  # float64 covers the plain configurations
                            vocab = char_vocab if level == "char" else word_vocab
                            bounds = (0, 5, 12, 20, 28, 34, 40) if classes else ()
                            cfg = ModelConfig(vocab_size=len(vocab), cell=cell, layers=layers, hidden=12, embed=embed,
                                              dropout=dropout, class_bounds=bounds)
                            name = f"{dtype}-{cell}-{layers}L-e{embed}-d{dropout}-{level}-c{classes}"
                            model = LanguageModel.create(cfg, seed=3, backend=backend)
                            rng = numpy.random.default_rng(7)
                            ids = rng.integers(0, len(vocab), size=(9, 5))
                            targets = rng.integers(0, len(vocab), size=(9, 5))
                            loss, grads, state = model.loss_and_grads(ids, targets, rng=numpy.random.default_rng(1))
                            out[f"{name}/loss"] = digest(to_host(loss))
                            out[f"{name}/grads"] = digest(*(to_host(grads[k]) for k in sorted(grads)))
                            out[f"{name}/state"] = digest(*(None if x is None else to_host(x) for hc in state for x in hc))
                            opt = make_optimizer("adam", model.params, 3e-3, model.ops)
                            st = None
                            drop_rng = numpy.random.default_rng(2)
                            for _ in range(3):
                                _, g, st = model.loss_and_grads(ids, targets, st, rng=drop_rng)
                                opt.step(g, clip_scale(global_norm(g, model.ops), 0.5))
                            out[f"{name}/adam3"] = digest(*(to_host(model.params[k]) for k in sorted(model.params)))
                            if dropout:
                                continue
                            pieces = {
                                "sample": dict(temperature=1.0),
                                "topk": dict(temperature=0.8, top_k=3, top_p=0.9),
                                "greedy": dict(temperature=0.0),
                            }
                            for what, kw in pieces.items():
                                gen = "".join(generate(model, vocab, 40, rng=numpy.random.default_rng(5), **kw))
                                out[f"{name}/{what}"] = hashlib.sha256(gen.encode()).hexdigest()[:16]
                            beam, lp = beam_search(model, vocab, 12, 3)
                            out[f"{name}/beam"] = hashlib.sha256(f"{beam}|{lp!r}".encode()).hexdigest()[:16]
                            lines = score_lines(model, vocab, text[level].splitlines(), with_tokens=True)
                            out[f"{name}/lines"] = digest(numpy.array([s.logprob for s in lines]),
                                                          numpy.concatenate([s.surprisal for s in lines]))
                            doc = score_document(model, vocab, text[level], streams=2, seq_len=7)
                            out[f"{name}/document"] = digest(numpy.array([doc.logprob]))


def training_fingerprints(out: dict):
    import numpy

    from charnn import api
    from charnn.io.checkpoint import load
    from charnn.nn import cells

    rng = numpy.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    corpus_text = "".join(" ".join(rng.choice(words, size=rng.integers(3, 9))) + ".\n" for _ in range(300))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(corpus_text, encoding="utf-8")
        for cell in sorted(cells.CELLS):
            for extra_name, extra in (("plain", {}),
                                      ("regularised", dict(dropout=0.2, weight_drop=0.2, state_reset=0.2,
                                                           weight_decay=0.1))):
                out_dir = Path(tmp) / f"{cell}-{extra_name}"
                api.train(corpus, out_dir, cell=cell, hidden=16, layers=2, seq_len=10, batch_size=4, max_steps=24,
                          eval_every=8, log_every=4, sample_length=20, device="cpu", seed=4, **extra)
                metrics = [json.loads(line) for line in open(out_dir / "metrics.jsonl", encoding="utf-8")]
                losses = numpy.array([m.get("train_loss", m.get("val_loss")) for m in metrics])
                name = f"train-{cell}-{extra_name}"
                out[f"{name}/losses"] = digest(losses)
                best = load(out_dir / "model.npz")
                out[f"{name}/model"] = digest(*(best.params[k] for k in sorted(best.params)))
                last = load(out_dir / "last.npz")
                out[f"{name}/last"] = digest(*(last.params[k] for k in sorted(last.params)),
                                             *(last.optim[k] for k in sorted(last.optim)))
                progress = {k: v for k, v in last.meta["progress"].items()
                            if k not in ("train_seconds", "elapsed", "horizon_seconds", "best_seconds", "best_step")}
                out[f"{name}/progress"] = hashlib.sha256(json.dumps(progress, sort_keys=True).encode()).hexdigest()[:16]


def dynamic_fingerprints(out: dict):
    """Dynamic evaluation of a small char and word model: the gradient statistics, scores with
    and without decay, a tuning over a grid given (searched as given), and the command line's
    whole pipeline with the rates given (statistics from the recorded corpus, or a file)."""
    import numpy
    from click.testing import CliRunner

    from charnn import api
    from charnn import dynamic as dyn
    from charnn.backend import get_backend
    from charnn.cli import cli
    from charnn.io.checkpoint import load_model

    rng = numpy.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "by", "sea"]

    def text_of(n):
        return "".join(" ".join(rng.choice(words, size=rng.integers(3, 9))) + ".\n" for _ in range(n))

    with tempfile.TemporaryDirectory() as tmp:
        corpus, scored, stats_file = Path(tmp) / "corpus.txt", Path(tmp) / "scored.txt", Path(tmp) / "stats.txt"
        corpus.write_text(text_of(300), encoding="utf-8")
        scored.write_text(text_of(12), encoding="utf-8")
        stats_file.write_text(text_of(40), encoding="utf-8")
        for level in ("char", "word"):
            run = Path(tmp) / f"dyn-{level}"
            api.train(corpus, run, level=level, hidden=16, layers=2, seq_len=10, batch_size=4, max_steps=30,
                      eval_every=10, log_every=5, sample_length=10, device="cpu", seed=2)
            for dtype in ("float32", "float64"):
                name = f"dynamic-{level}-{dtype}"
                lm, vocab, _ = load_model(run / "model.npz", get_backend("cpu", dtype))
                ms = dyn.gradient_stats(lm, dyn.text_ids(vocab, stats_file.read_text()), 6)
                out[f"{name}/stats"] = digest(*(numpy.asarray(ms[k]) for k in sorted(ms)))
                text = scored.read_text()
                for lr, decay in ((1e-3, 0.0), (3e-3, 1e-2)):
                    s = dyn.score_dynamic(lm, vocab, text, dyn.DynamicSettings(lr, decay, 6), ms, with_tokens=True)
                    out[f"{name}/score-{lr:g}-{decay:g}"] = digest(numpy.array(s.surprisal))
                best, results = dyn.tune(lm, dyn.text_ids(vocab, text_of(6)), ms, 6, lrs=(1e-4, 1e-3, 1e-2),
                                         decays=(0.0, 1e-3))
                out[f"{name}/tune"] = digest(numpy.array([r[2] for r in results]),
                                             numpy.array([best.lr, best.decay, best.segment]))
            for what, extra in (("recorded", []), ("file", ["--dynamic-stats", stats_file, "--dynamic-segment", "7"])):
                r = CliRunner().invoke(cli, [str(a) for a in ["score", run, scored, "--document", "--dynamic",
                                                              "--dynamic-lr", "0.002", "--dynamic-decay", "0.001",
                                                              "--format", "jsonl", "--device", "cpu", "-q", *extra]])
                summary = json.loads(r.stdout.splitlines()[-1]) if r.exit_code == 0 else {"error": r.output}
                kept = {k: summary.get(k) for k in ("tokens", "logprob", "nats_per_token", "error")}
                kept["dynamic"] = {k: v for k, v in summary.get("dynamic", {}).items() if k != "stats"}
                out[f"dynamic-{level}-cli-{what}"] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def fingerprints() -> dict:
    out: dict = {}
    model_fingerprints(out)
    training_fingerprints(out)
    dynamic_fingerprints(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="TREE", help="another checkout of charnn to compare with")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set for both versions (e.g. CHARNN_THREADS=1)")
    ap.add_argument("--json", action="store_true", help="print this checkout's fingerprints as JSON")
    args = ap.parse_args()
    for pair in args.env:
        name, _, value = pair.partition("=")
        os.environ[name] = value
    if not args.against:
        json.dump(fingerprints(), sys.stdout, indent=1, sort_keys=True)
        print()
        return
    here = Path(__file__).resolve().parents[1]
    results = {}
    for label, tree in (("old", Path(args.against).resolve()), ("new", here)):
        env = dict(os.environ, PYTHONPATH=str(tree))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=tree,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{label} ({tree}) failed:\n{proc.stderr[-3000:]}")
        results[label] = json.loads(proc.stdout)
    old, new = results["old"], results["new"]
    common = sorted(set(old) & set(new))
    differ = [k for k in common if old[k] != new[k]]
    only = sorted(set(old) ^ set(new))
    for k in differ:
        print(f"differs: {k}")
    for k in only:
        print(f"only in {'old' if k in old else 'new'}: {k}")
    print(f"{len(differ)} of {len(common)} fingerprints differ ({len(only)} only in one version)")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
