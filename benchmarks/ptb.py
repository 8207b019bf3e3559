"""Word-level perplexity after a fixed training time: charnn against PyTorch, side by side.

    python benchmarks/ptb.py --seconds 300

Both train the same model — word LSTM 2x200, embedding 200, sequence 35, batch 20, Adam (lr
2e-3), global-norm clip 5, no dropout — on the first 90% of ../shared/corpora/ptb.valid.txt
(whitespace tokens, one <eos> per line) for the same wall-clock time of training steps on the
same threads. After every epoch each side measures its loss on the last 10% of ptb.valid.txt
(time not counted) and keeps its best parameters: 74k tokens is small enough that a 2x200 LSTM
without dropout overfits within minutes, so the fixed-time model must be chosen by held-out
loss, the same way on both sides. The kept model then scores ../shared/corpora/ptb.test.txt as
one document with carried state (every token predicted once).
charnn runs twice: with a full softmax (the same output layer as PyTorch) and with its default
class-factored softmax (about sqrt(V) classes). The unigram baseline (training-set word
frequencies, add-one smoothed) is printed too. Runs are one after another in this process.

``--dynamic`` adds dynamic evaluation (charnn/dynamic.py) of each charnn model kept: gradient
statistics on the last 20,000 training tokens, the learning rate and decay chosen by
dynamic.tune's grid on the held-out 10% of ptb.valid.txt, then ptb.test.txt scored once, static
and dynamic. ``--variants`` runs only some of the models (e.g. ``--variants class --dynamic``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"
H, E, L, N, T, LR, CLIP = 200, 200, 2, 20, 35, 2e-3, 5.0


def load(vocab=None):
    from charnn.io.vocab import Vocab

    train_text = (SHARED / "ptb.valid.txt").read_text(encoding="utf-8")
    test_text = (SHARED / "ptb.test.txt").read_text(encoding="utf-8")
    if vocab is None:
        vocab = Vocab.build_word(Vocab.count_words(train_text, "whitespace"), "whitespace")
    return vocab, vocab.encode(train_text), vocab.encode(test_text)


def unigram(train_ids, test_ids, V):
    counts = numpy.bincount(train_ids, minlength=V) + 1.0
    logp = numpy.log(counts / counts.sum())
    return math.exp(-logp[test_ids].mean())


def batches(ids):
    S = len(ids) // N
    streams = ids[: N * S].reshape(N, S)
    k = 0
    while True:
        if (k + 1) * T + 1 > S:
            k = 0
            yield None  # epoch boundary: reset the state
        a = k * T
        yield streams[:, a:a + T].T.copy(), streams[:, a + 1:a + T + 1].T.copy()
        k += 1


def train_charnn(train_ids, held_ids, V, seconds, classes):
    from charnn.nn.functional import class_bounds
    from charnn.nn.model import LanguageModel, ModelConfig
    from charnn.nn.optim import clip_scale, global_norm, make_optimizer
    from charnn.train import evaluate

    bounds = class_bounds(numpy.bincount(train_ids, minlength=V), classes) if classes else ()
    model = LanguageModel.create(ModelConfig(vocab_size=V, cell="lstm", layers=L, hidden=H, embed=E,
                                             class_bounds=tuple(bounds)), seed=0)
    opt = make_optimizer("adam", model.params, LR, model.ops)
    state, steps, spent = None, 0, 0.0
    best = (float("inf"), None, 0)
    for b in batches(train_ids):
        if b is None:  # end of an epoch: held-out loss, keep the best parameters (not timed)
            held = evaluate(model, held_ids, 1, 200)  # one stream, as score_torch does
            if held < best[0]:
                best = (held, model.host_params(), steps)
            state = None
            if spent >= seconds:
                break
            continue
        if spent >= seconds:
            continue  # finish the epoch's bookkeeping only
        t = time.perf_counter()
        loss, grads, state = model.loss_and_grads(b[0], b[1], state, sparse=True)
        opt.step(grads, clip_scale(global_norm(grads, model.ops), CLIP))
        spent += time.perf_counter() - t
        steps += 1
    model = LanguageModel(model.config, best[1], model.backend)
    return model, steps, best[0], best[2]


def score_charnn(model, vocab, test_text):
    from charnn.score import score_document

    s = score_document(model, vocab, test_text, streams=1, seq_len=200)
    return s.perplexity, s.tokens


def dynamic_charnn(model, vocab, fit_ids, held_ids, test_text, segment):
    """Dynamic evaluation of a kept model: statistics on the training text, η and λ tuned on the
    held-out text, the test text scored. Returns (perplexity, settings, tuning results, tokens/s)."""
    from charnn import dynamic

    stats = dynamic.gradient_stats(model, fit_ids, segment)
    settings, results = dynamic.tune(model, numpy.asarray(held_ids, dtype=numpy.int64), stats, segment)
    t = time.perf_counter()
    s = dynamic.score_dynamic(model, vocab, test_text, settings, stats)
    return s.perplexity, settings, results, s.tokens / (time.perf_counter() - t)


def train_torch(train_ids, held_ids, V, seconds):
    import copy

    import torch

    torch.manual_seed(0)
    emb, rnn, head = torch.nn.Embedding(V, E), torch.nn.LSTM(E, H, L), torch.nn.Linear(H, V)
    params = list(emb.parameters()) + list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    h, steps, spent = None, 0, 0.0
    best = (float("inf"), None, 0)
    for b in batches(train_ids):
        if b is None:
            ppl, _ = score_torch((emb, rnn, head), held_ids[1:], int(held_ids[0]))
            held = math.log(ppl)
            if held < best[0]:
                best = (held, copy.deepcopy((emb, rnn, head)), steps)
            h = None
            if spent >= seconds:
                break
            continue
        if spent >= seconds:
            continue
        t = time.perf_counter()
        x, y = torch.from_numpy(b[0]), torch.from_numpy(b[1])
        out, h = rnn(emb(x), h)
        h = tuple(a.detach() for a in h)
        loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        spent += time.perf_counter() - t
        steps += 1
    return best[1], steps, best[0], best[2]


def score_torch(parts, test_ids, start_id):
    import torch

    emb, rnn, head = parts
    seq = numpy.concatenate([[start_id], test_ids])
    total, h = 0.0, None
    with torch.no_grad():
        for a in range(0, len(seq) - 1, 200):
            x = torch.from_numpy(seq[a:a + 200][:len(seq) - 1 - a].copy()).reshape(-1, 1)
            y = torch.from_numpy(seq[a + 1:a + 201].copy()).reshape(-1)
            out, h = rnn(emb(x), h)
            total += float(torch.nn.functional.cross_entropy(head(out).reshape(-1, head.out_features), y, reduction="sum"))
    return math.exp(total / (len(seq) - 1)), len(seq) - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="class,full,torch",
                    help="models to run: class (charnn class softmax), full (charnn full softmax), torch")
    ap.add_argument("--dynamic", action="store_true", help="also score the test text with dynamic evaluation")
    ap.add_argument("--dynamic-segment", type=int, default=None, help="segment length [the word default]")
    args = ap.parse_args()
    variants = set(args.variants.split(","))
    if not (SHARED / "ptb.valid.txt").exists():
        sys.exit(f"PTB files not found under {SHARED}")
    from threadpoolctl import threadpool_info, threadpool_limits

    if "torch" in variants:
        import torch

        torch.set_num_threads(args.threads)
    vocab, train_ids, test_ids = load()
    V = len(vocab)
    test_text = (SHARED / "ptb.test.txt").read_text(encoding="utf-8")
    print(f"PTB: vocabulary {V}, {len(train_ids):,} training tokens (ptb.valid.txt), {len(test_ids):,} test tokens; "
          f"{args.seconds:g} s each on {args.threads} threads; BLAS "
          f"{[(i.get('internal_api'), i.get('architecture')) for i in threadpool_info()]}", flush=True)
    print(f"unigram baseline perplexity {unigram(train_ids, test_ids, V):.1f}", flush=True)
    cut = int(len(train_ids) * 0.9)
    fit_ids, held_ids = train_ids[:cut], train_ids[cut:]
    print(f"training on {len(fit_ids):,} tokens, choosing the kept model on {len(held_ids):,} held-out tokens", flush=True)
    with threadpool_limits(args.threads):
        for name, label, classes in (("class", "charnn class softmax", round(math.sqrt(V))),
                                     ("full", "charnn full softmax", 0)):
            if name not in variants:
                continue
            model, steps, held, at = train_charnn(fit_ids, held_ids, V, args.seconds, classes)
            ppl, n = score_charnn(model, vocab, test_text)
            print(f"{label:22s} steps {steps:5d}  kept step {at:5d} (held-out ppl {math.exp(held):7.1f})  "
                  f"test perplexity {ppl:8.2f}  ({n} tokens)", flush=True)
            if args.dynamic:
                from charnn.dynamic import DEFAULTS

                segment = args.dynamic_segment or DEFAULTS["word"].segment
                dppl, settings, results, rate = dynamic_charnn(model, vocab, fit_ids, held_ids, test_text, segment)
                grid = "  ".join(f"{lr:g}/{d:g}: {math.exp(x):.1f}" for lr, d, x in results)
                print(f"{'':22s} tuning (lr/decay: held-out ppl) {grid}", flush=True)
                print(f"{label + ' dynamic':22s} lr {settings.lr:g} decay {settings.decay:g} segment "
                      f"{settings.segment}  test perplexity {dppl:8.2f} (static {ppl:.2f})  {rate:.0f} tokens/s",
                      flush=True)
        if "torch" not in variants:
            return
        parts, steps, held, at = train_torch(fit_ids, held_ids, V, args.seconds)
        ppl, n = score_torch(parts, test_ids, vocab.eos_id)
        print(f"{'pytorch nn.LSTM':22s} steps {steps:5d}  kept step {at:5d} (held-out ppl {math.exp(held):7.1f})  "
              f"test perplexity {ppl:8.2f}  ({n} tokens)", flush=True)


if __name__ == "__main__":
    main()
