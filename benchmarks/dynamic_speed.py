"""Dynamic evaluation's speed against static scoring's, on the same model and text, for one or
more versions of charnn side by side.

    python benchmarks/dynamic_speed.py                          this checkout, the bundled model
    python benchmarks/dynamic_speed.py /tmp/charnn-old .        an older checkout against this one
    python benchmarks/dynamic_speed.py . --env CHARNN_PACKED=0  the AVX2 machines' path

The text is the first --chars characters of tiny Shakespeare's last 10% (the held-out text of
benchmarks/README.md, "Dynamic evaluation"); the gradient statistics come from the last 20,000
training tokens of the corpus the model file records, as `charnn score --dynamic` takes them.
Each version runs in a worker process of its own; in each round every worker scores the text
statically (`score --document`'s score_document, one stream) and then dynamically
(score_dynamic, the level's defaults), in turn, so the machine's swings hit both alike. The
figures are medians over the rounds of tokens a second, and of dynamic/static within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "shared", "corpora", "tinyshakespeare.txt")


def worker():
    """Serve one version: read JSON commands on stdin, answer each with one JSON line."""
    import charnn
    from charnn import dynamic as dyn
    from charnn.backend import get_backend
    from charnn.io.checkpoint import default_model_path, load_model
    from charnn.score import score_document

    lm = vocab = stats = text = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "setup":
            path = cmd["model"] or default_model_path()
            lm, vocab, ckpt = load_model(path, get_backend("cpu", "float32"))
            text = cmd["text"]
            segment = dyn.DEFAULTS[vocab.level].segment
            # (in charnn.dynamic_run since 2026-12-05; charnn.dynamic in older checkouts)
            try:
                from charnn.dynamic_run import training_side_ids
            except ImportError:
                training_side_ids = dyn.training_side_ids
            ids, _ = training_side_ids(ckpt.meta, vocab, path, cmd["stats_tokens"])
            stats = dyn.gradient_stats(lm, ids, segment, cmd["stats_tokens"])
            score_document(lm, vocab, text[:2000])  # compiled code loaded, products packed once
            dyn.score_dynamic(lm, vocab, text[:2000], dyn.DEFAULTS[vocab.level], stats)
            out = {"file": charnn.__file__}
        elif cmd["cmd"] == "round":
            t0 = time.perf_counter()
            s = score_document(lm, vocab, text)
            t1 = time.perf_counter()
            d = dyn.score_dynamic(lm, vocab, text, dyn.DEFAULTS[vocab.level], stats)
            t2 = time.perf_counter()
            out = {"static": s.tokens / (t1 - t0), "dynamic": d.tokens / (t2 - t1),
                   "static_nats": s.nats_per_token, "dynamic_nats": d.nats_per_token}
        else:
            return
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def start(tree, env):
    full = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    full.update(env)
    full["PYTHONPATH"] = os.path.abspath(tree)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=full, cwd=os.path.abspath(tree))


def ask(proc, **cmd):
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker ended early (exit {proc.wait()})")
    return json.loads(line)


def main():
    if "--worker" in sys.argv:
        return worker()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="*", default=["."], help="charnn checkouts (their roots) [.]")
    ap.add_argument("--model", default=None, help="a model file [the bundled one]")
    ap.add_argument("--corpus", default=CORPUS)
    ap.add_argument("--chars", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stats-tokens", type=int, default=20_000, help="tokens the gradient statistics are measured on")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the workers (repeatable)")
    a = ap.parse_args()
    if not os.path.isfile(a.corpus):
        raise SystemExit(f"{a.corpus}: not found (the shared corpora sit beside the checkout; or give --corpus)")
    with open(a.corpus, encoding="utf-8") as f:
        corpus = f.read()
    text = corpus[len(corpus) - round(len(corpus) * 0.1):][:a.chars]
    env = dict(kv.split("=", 1) for kv in a.env)
    workers = [start(t, env) for t in a.trees]
    for t, w in zip(a.trees, workers):
        print(f"{t}: {ask(w, cmd='setup', model=a.model and os.path.abspath(a.model), text=text, stats_tokens=a.stats_tokens)['file']}", flush=True)
    got = {t: [] for t in a.trees}
    for r in range(a.rounds):
        for t, w in zip(a.trees, workers):
            got[t].append(ask(w, cmd="round"))
            g = got[t][-1]
            print(f"  round {r + 1} {t}: static {g['static']:,.0f} tok/s, dynamic {g['dynamic']:,.0f} "
                  f"({g['dynamic'] / g['static']:.3f})", flush=True)
    for w in workers:
        ask_end = w.stdin
        ask_end.write(json.dumps({"cmd": "end"}) + "\n")
        ask_end.close()
        w.wait()
    print(f"{len(text):,} characters; medians of {a.rounds} rounds{', ' + ' '.join(a.env) if a.env else ''}:")
    for t in a.trees:
        rows = got[t]
        print(f"  {t}: static {statistics.median(r['static'] for r in rows):,.0f} tok/s "
              f"({rows[0]['static_nats']:.6f} nats/token), dynamic {statistics.median(r['dynamic'] for r in rows):,.0f} "
              f"({rows[0]['dynamic_nats']:.6f}); dynamic/static {statistics.median(r['dynamic'] / r['static'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
