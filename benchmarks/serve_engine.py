"""charnn serve's engine side, without HTTP: the engine's batched step alone against the
scheduler (charnn/serve/scheduler.py) decoding the same number of concurrent sequences,
and how often batched arithmetic changes a seeded sequence's text.

    flock /tmp/charnn-cpu.lock python benchmarks/serve_engine.py            # both models
    flock /tmp/charnn-cpu.lock python benchmarks/serve_engine.py --agree 256 # + the agreement count

For each model (the bundled LSTM, 2x384 since 2026-12-06 and 2x256 before, and a 2x512 LSTM
with random weights over the same vocabulary) and N in 1, 4, 16, 64:
  engine     aggregate tokens/s of model.stepper(N).step alone (N streams, one step each);
  scheduler  aggregate tokens/s of N sequences decoded together by a Scheduler with N slots
             (sampling, stop rules, events into an asyncio queue consumed on a loop, as the
             server does; no HTTP), and its ratio to the engine's at N and to N single steps;
  in the step  the share of the scheduler's wall time spent in the engine's step (the rest
             is sampling, events and joining: the scheduler's own overhead).
Rounds are interleaved (engine, scheduler, engine, ...); the best of --rounds is shown (on a
shared machine the best round is the one least disturbed), with the median in brackets.

--agree K: K seeded sequences of --agree-tokens tokens each decoded 16 at a time by the
scheduler against sample.generate alone (a width-1 stepper): how many texts differ.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy  # noqa: E402

from charnn.io.checkpoint import default_model_path, load_model  # noqa: E402
from charnn.nn.model import LanguageModel, ModelConfig  # noqa: E402
from charnn.sample import generate, start_ids  # noqa: E402
from charnn.serve.channel import Channel  # noqa: E402
from charnn.serve.scheduler import Scheduler, Sequence  # noqa: E402

PROMPT = "ROMEO:"


def engine_rate(model, N: int, seconds: float) -> float:
    stepper = model.stepper(N)
    rng = numpy.random.default_rng(0)
    V = model.config.vocab_size
    ids = rng.integers(0, V, (64, N))
    for i in range(20):  # past the thread tuner's trials
        stepper.step(ids[i % 64])
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(16):
            stepper.step(ids[i])
        steps += 16
    return N * steps / (time.perf_counter() - t0)


def scheduler_rate(scheduler: Scheduler, vocab, N: int, tokens: int) -> tuple:
    """(tokens/s, the share of the wall time spent in the engine's step)."""
    stepping = []
    scheduler.on_step = lambda n, seconds: stepping.append(seconds)

    async def run():
        channel = Channel(asyncio.get_running_loop())
        seqs = [Sequence(index=i, ids=start_ids(vocab, PROMPT), prompt=PROMPT, max_tokens=tokens, seed=(1, i),
                         channel=channel) for i in range(N)]
        t0 = time.perf_counter()
        scheduler.submit(seqs)
        ends = made = 0
        while ends < N:
            for ev in await channel.take():
                if ev[0] == "piece":
                    made += 1
                else:
                    ends += 1
        wall = time.perf_counter() - t0
        return made / wall, sum(stepping) / wall

    return asyncio.run(run())


def agreement(model, vocab, count: int, tokens: int, slots: int = 16) -> tuple:
    scheduler = Scheduler(model, vocab, slots=slots, queue=count).start()
    scheduler.ready.wait()

    async def run():
        channel = Channel(asyncio.get_running_loop())
        texts = [""] * count
        scheduler.submit([Sequence(index=i, ids=start_ids(vocab, PROMPT), prompt=PROMPT, max_tokens=tokens,
                                   seed=(7, i), channel=channel) for i in range(count)])
        ends = 0
        while ends < count:
            for ev in await channel.take():
                if ev[0] == "piece":
                    texts[ev[1]] += ev[2]
                else:
                    ends += 1
        return texts

    texts = asyncio.run(run())
    scheduler.stop()
    differ, first = 0, []
    for i, text in enumerate(texts):
        ref = "".join(generate(model, vocab, tokens, prime=PROMPT, rng=numpy.random.default_rng([7, i])))
        if ref != text:
            differ += 1
            first.append(next(j for j, (a, b) in enumerate(zip(ref, text)) if a != b))
    return differ, first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="Engine timing per round and N.")
    ap.add_argument("--tokens", type=int, default=300, help="Tokens per sequence in the scheduler's rounds.")
    ap.add_argument("--agree", type=int, default=0)
    ap.add_argument("--agree-tokens", type=int, default=300)
    ap.add_argument("--agree-slots", type=int, default=16)
    ap.add_argument("--models", default="bundled,2x512")
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# {time.strftime('%Y-%m-%d')} commit {commit}, {cpu}, {os.cpu_count()} cores, "
          f"CHARNN_PACKED={os.environ.get('CHARNN_PACKED', 'default')}")
    bundled, vocab, _ = load_model(default_model_path())
    models = {"bundled": bundled,
              "2x512": LanguageModel.create(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=2, hidden=512), 0)}
    for name in filter(None, args.models.split(",")):
        model = models[name]
        print(f"\n## {name}: tokens/s, best (median) of {args.rounds} interleaved rounds")
        print("| N | engine step | scheduler | scheduler / engine | scheduler / (N single steps) | in the step |")
        print("|---|---|---|---|---|---|")
        single = None
        for N in ns:
            scheduler = Scheduler(model, vocab, slots=N, queue=0).start()
            scheduler.ready.wait()
            eng, sch, share = [], [], []
            for _ in range(args.rounds):
                eng.append(engine_rate(model, N, args.seconds))
                rate, part = scheduler_rate(scheduler, vocab, N, args.tokens)
                sch.append(rate)
                share.append(part)
            scheduler.stop()
            e, s = max(eng), max(sch)
            if N == 1:
                single = e
            print(f"| {N} | {e:,.0f} ({statistics.median(eng):,.0f}) | {s:,.0f} ({statistics.median(sch):,.0f}) | "
                  f"{s / e:.2f} | {s / single:.2f} | {statistics.median(share):.0%} |", flush=True)
    if args.agree:
        differ, first = agreement(bundled, vocab, args.agree, args.agree_tokens, args.agree_slots)
        print(f"\nagreement (bundled model, {args.agree_slots} slots): {differ} of {args.agree} seeded sequences of "
              f"{args.agree_tokens} tokens differ from sample.generate alone"
              + (f" (first differing token at {first})" if first else ""))


if __name__ == "__main__":
    main()
