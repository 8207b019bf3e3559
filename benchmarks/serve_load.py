"""Load on `charnn serve`: concurrent streaming clients over loopback against the batched server,
side by side with the same clients against one request at a time and against a loop that runs
`charnn sample` per request, and the engine's own batched step timed directly.

    flock /tmp/charnn-cpu.lock python benchmarks/serve_load.py              # both models, 1,000-request soak
    flock /tmp/charnn-cpu.lock python benchmarks/serve_load.py --soak 10000 # the issue's soak
    flock /tmp/charnn-cpu.lock python benchmarks/serve_load.py --bars 5     # the issue's bars, interleaved
    python benchmarks/serve_load.py --clients 1,4 --models default --soak 0 --no-sample   # a quick look
    flock /tmp/charnn-cpu.lock python benchmarks/serve_load.py --models default --ab NAME=VALUE  # A/B, see ab()

For each model (the bundled model, 2x384 since 2026-12-06 and 2x256 before, and a 2x512 LSTM
with random weights, built here and saved to a temporary folder) it starts `charnn serve` on
127.0.0.1 (a free port; nothing else is contacted) and runs, for 1, 4, 16 and 64 clients, each
client streaming ``--rounds`` requests of ``--tokens`` tokens one after another (new requests
stop after ``--seconds``):

- batched: the server with ``--slots`` equal to the most clients, so every stream decodes in
  one batch;
- one at a time: the server with one slot (requests queue; the queue is made long enough);
- charnn sample: each request is a `charnn sample` process (the model loaded every time).

Per phase: aggregate tokens per second (tokens received / the phase's wall time), time to first
token and time per token (per request: (last token - first token) / (tokens - 1)) at p50 and
p99, errors. Then the engine's stepper alone at the same N (its batched step, and the step with
a token drawn per stream, which is what the server adds to it), and the server's memory (RSS
from /proc) over a soak of short requests by 16 clients. The clients run in this process
(asyncio) on the same cores as the server, so they cost it CPU: by default each is a raw
socket client (RawClient: keep-alive HTTP/1.1, the answer searched as bytes for the event
markers, no JSON parsed; --client httpx, the client before 2026-12-05, is kept), which used
2-9% of one core at 1-64 clients on 2026-12-05; the table shows each side's CPU (100% = one
core). Every run is bounded: requests by --rounds and --soak, time by --seconds
and a per-request limit.
"""

from __future__ import annotations

import os
import re

for _name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # as bench.py: they slow a current NumPy
    os.environ.pop(_name, None)

import argparse
import asyncio
import json
import concurrent.futures
import datetime
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from charnn.backend import get_backend, to_host  # noqa: E402
from charnn.io import checkpoint  # noqa: E402
from charnn.nn.model import ModelConfig, init_params  # noqa: E402
from charnn.sample import sample_index  # noqa: E402
from serve_support import serve_env, serve_process  # noqa: E402

PROMPT = "ROMEO:"
EVENT = b"data: {"  # each streamed event starts so; the end is data: [DONE]
USAGE = re.compile(rb'"completion_tokens": (\d+)')  # in the last event (stream_options.include_usage)
REQUEST_LIMIT = 300.0  # seconds: a request still open after this counts as an error
CLIENT = "raw"  # the load's client: "raw" (RawClient) or "httpx" (stream_one); --client


@dataclass
class Request:
    tokens: int = 0
    ttft: float | None = None  # seconds from sending to the first token
    tpot: float | None = None  # seconds per token after the first
    error: str | None = None


async def stream_one(client, url: str, tokens: int, seed: int) -> Request:
    """One streamed completion, read as raw bytes (no JSON parsing, so the client costs the
    shared cores little): the first and last events' times, and the token count from the usage
    event (an event holds one token, or the several that waited while the client was slow)."""
    import httpx

    body = {"model": "x", "prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    out = Request()
    t0 = time.perf_counter()
    first = last = None
    events, tail, done, made, utail = 0, b"", False, None, b""
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                out.error = f"HTTP {r.status_code}"
                return out
            async for chunk in r.aiter_raw():
                buf = tail + chunk
                k = buf.count(EVENT)
                if k:
                    last = time.perf_counter()
                    first = first or last
                    events += k
                if b'"error"' in buf:
                    out.error = "error event"
                done = done or b"[DONE]" in buf
                window = utail + chunk  # (a usage split between chunks is found whole here)
                found = USAGE.search(window)
                if found:
                    made = int(found.group(1))
                utail = window[-64:]
                tail = buf[-(len(EVENT) - 1):]  # a split marker is found once, never twice
    except httpx.HTTPError as e:
        out.error = type(e).__name__
        return out
    return _finish(out, done, made, t0, first, last)


def _finish(out, done, made, t0, first, last):
    """A stream's result from what its client saw: an error where [DONE] or the usage event
    never came, the tokens the usage counted, time to the first event and per token after it."""
    if not done and out.error is None:
        out.error = "no [DONE]"
    if made is None and out.error is None:
        out.error = "no usage event"
    out.tokens = made or 0
    if first is not None:
        out.ttft = first - t0
        if out.tokens > 1:
            out.tpot = (last - first) / (out.tokens - 1)
    return out


class RawClient:
    """A streaming client on raw asyncio sockets, cheap per token and per request (the
    default; --client httpx uses httpx as before): HTTP/1.1 with keep-alive connections (an
    idle one is reused), the request written as one block of bytes, the chunked answer read
    as raw bytes and searched for the markers as stream_one does (no JSON parsing, no chunk
    framing undone: an event never holds CR LF, so the markers are never cut by the
    framing). The server's answer ends with the zero-length chunk after [DONE]."""

    END = b"\r\n0\r\n\r\n"

    def __init__(self, url: str):
        hostport = url.split("://", 1)[1].rstrip("/")
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.idle: list = []

    async def close(self):
        for _, writer in self.idle:
            writer.close()
        self.idle = []

    async def stream(self, tokens: int, seed: int) -> Request:
        body = json.dumps({"model": "x", "prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0, "seed": seed,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        out = Request()
        t0 = time.perf_counter()
        try:
            if self.idle:
                reader, writer = self.idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(head + body)
            status = await reader.readuntil(b"\r\n")
            headers = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            out.error = type(e).__name__
            return out
        if not status.startswith(b"HTTP/1.1 200"):
            out.error = f"HTTP {status.split()[1].decode() if len(status.split()) > 1 else '?'}"
            writer.close()
            return out
        del headers
        first = last = None
        tail, utail, done, made, ended = b"", b"", False, None, False
        try:
            while not ended:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf = tail + chunk
                if EVENT in buf:
                    last = time.perf_counter()
                    first = first or last
                if b'"error"' in buf:
                    out.error = "error event"
                done = done or b"[DONE]" in buf
                window = utail + chunk
                found = USAGE.search(window)
                if found:
                    made = int(found.group(1))
                ended = done and self.END in window
                utail = window[-64:]
                tail = buf[-(len(EVENT) - 1):]
        except OSError as e:
            out.error = type(e).__name__
        if ended and out.error is None:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return _finish(out, done, made, t0, first, last)


def sample_one(model: str, tokens: int, seed: int) -> Request:
    """One request served by a fresh `charnn sample` process (first token: its first byte past
    the echoed prompt); killed past the request limit."""
    out = Request()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "charnn", "sample", model, "--length", str(tokens), "--prime", PROMPT,
                             "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=serve_env(), cwd=str(ROOT))
    watchdog = threading.Timer(REQUEST_LIMIT, proc.kill)
    watchdog.start()
    got = 0
    first = last = None
    try:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            got += len(chunk)
            if got > len(PROMPT):
                last = time.perf_counter()
                first = first or last
    finally:
        proc.stdout.close()
        watchdog.cancel()
    if proc.wait() != 0:
        out.error = "timeout" if proc.returncode == -9 else f"exit {proc.returncode}"
        return out
    out.tokens = tokens
    if first is not None:
        out.ttft = first - t0
        out.tpot = (last - first) / max(tokens - 1, 1)
    return out


async def run_phase(clients: int, rounds: int, seconds: float, one) -> tuple[list[Request], float]:
    """``clients`` workers, each making up to ``rounds`` requests in turn (none started after
    ``seconds``); returns the requests and the wall time."""
    deadline = time.perf_counter() + seconds
    done: list[Request] = []

    async def worker(c):
        for r in range(rounds):
            if time.perf_counter() > deadline:
                return
            try:
                done.append(await asyncio.wait_for(one(1000 * c + r), REQUEST_LIMIT))
            except asyncio.TimeoutError:
                done.append(Request(error="timeout"))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(clients)))
    return done, time.perf_counter() - t0


def summary(kind: str, clients: int, done: list[Request], wall: float) -> dict:
    ok = [r for r in done if r.error is None]
    tokens = sum(r.tokens for r in ok)

    def pct(values, q):
        return float(numpy.percentile(values, q)) * 1000 if values else float("nan")

    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    errors = sorted({r.error for r in done if r.error})
    return {"kind": kind, "clients": clients, "requests": len(done), "tokens": tokens, "wall": wall,
            "rate": tokens / wall if wall else 0.0, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99),
            "tpot50": pct(tpot, 50), "tpot99": pct(tpot, 99), "errors": len(done) - len(ok),
            "error_kinds": ", ".join(errors)}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_phase(url: str, pid: int, clients: int, rounds: int, tokens: int, seconds: float, kind: str) -> dict:
    """One phase against a running server; with the CPU the server and this process (the
    clients) used, as a fraction of one core over the phase's wall time."""
    async def go():
        if CLIENT == "raw":
            raw = RawClient(url)
            try:
                await raw.stream(8, 0)  # a connection and a request before the clock
                s0, c0 = cpu_seconds(pid), time.process_time()
                done, wall = await run_phase(clients, rounds, seconds, lambda seed: raw.stream(tokens, seed))
                return done, wall, (cpu_seconds(pid) - s0) / wall, (time.process_time() - c0) / wall
            finally:
                await raw.close()
        import httpx

        limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_LIMIT), limits=limits) as client:
            await stream_one(client, url, 8, 0)  # a connection and a request before the clock
            s0, c0 = cpu_seconds(pid), time.process_time()
            done, wall = await run_phase(clients, rounds, seconds, lambda seed: stream_one(client, url, tokens, seed))
            return done, wall, (cpu_seconds(pid) - s0) / wall, (time.process_time() - c0) / wall

    done, wall, server_cpu, client_cpu = asyncio.run(go())
    row = summary(kind, clients, done, wall)
    # CPU per token: what the shared machine's other load does not change much.
    return {**row, "server_cpu": server_cpu, "client_cpu": client_cpu,
            "server_us": server_cpu * wall / max(row["tokens"], 1) * 1e6}


def sample_phase(model: str, clients: int, rounds: int, tokens: int, seconds: float) -> dict:
    """The clients against a loop that runs `charnn sample` per request (a thread a client)."""
    deadline = time.perf_counter() + seconds

    def worker(c):
        done = []
        for r in range(rounds):
            if time.perf_counter() > deadline:
                break
            done.append(sample_one(model, tokens, 1000 * c + r))
        return done

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(worker, range(clients)) for r in rs]
    return summary("charnn sample", clients, done, time.perf_counter() - t0)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(url: str, pid: int, requests: int, clients: int = 16, tokens: int = 32) -> dict:
    """``requests`` short streamed requests by ``clients`` clients; the server's RSS after each
    tenth of them."""
    import httpx

    marks = []

    async def go():
        limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_LIMIT), limits=limits) as client:
            todo = iter(range(requests))
            errors = 0
            count = 0
            step = max(requests // 10, 1)

            async def worker():
                nonlocal errors, count
                for i in todo:
                    r = await stream_one(client, url, tokens, i)
                    errors += r.error is not None
                    count += 1
                    if count % step == 0:
                        marks.append((count, rss_mib(pid)))

            await asyncio.gather(*(worker() for _ in range(clients)))
            return errors

    before = rss_mib(pid)
    t0 = time.perf_counter()
    errors = asyncio.run(go())
    return {"requests": requests, "errors": errors, "seconds": time.perf_counter() - t0, "before": before,
            "marks": marks}


_LOADED = {}  # model path -> (model, vocab, checkpoint), loaded once


def engine_rates(model_path: str, Ns, blocks: int = 5, seconds: float = 0.3) -> dict:
    """For each N: tokens per second of the model's stepper advancing N streams (its batched
    step), and of the step plus a token drawn for each stream (the server's per-step work
    without HTTP), each the fastest of ``blocks`` timed blocks (the machine is shared; the
    fastest block is the least disturbed), with the CPU time per token of that block (us)."""
    if model_path not in _LOADED:
        _LOADED[model_path] = checkpoint.load_model(model_path, get_backend("auto", "float32"))
    model, vocab, _ = _LOADED[model_path]
    out = {}
    for N in Ns:
        stepper = model.stepper(N)
        rng = numpy.random.default_rng(0)
        rngs = [numpy.random.default_rng([i, 0]) for i in range(N)]
        ids = rng.integers(0, len(vocab.tokens), N)
        found = []
        for draw in (False, True):

            def advance(ids):
                logits = stepper.step(ids)
                if not draw:
                    return ids
                host = to_host(logits)
                return numpy.array([sample_index(host[i], 1.0, rngs[i], model.ops) for i in range(N)])

            for _ in range(20):  # compiled kernels and the thread tuner settle first
                ids = advance(ids)
            best = (0.0, float("nan"))
            for _ in range(blocks):
                steps, t0, c0 = 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - t0 < seconds:
                    ids = advance(ids)
                    steps += 1
                rate = N * steps / (time.perf_counter() - t0)
                if rate > best[0]:
                    best = (rate, (time.process_time() - c0) / (N * steps) * 1e6)
            found += best
        out[N] = tuple(found)  # (step rate, step CPU us/token, step+draw rate, step+draw CPU us/token)
    return out


def build_2x512(folder: Path) -> Path:
    """An LSTM 2x512 over the bundled model's vocabulary, random weights (speed only)."""
    base = checkpoint.load(checkpoint.default_model_path())
    config = ModelConfig(vocab_size=base.config.vocab_size, cell="lstm", layers=2, hidden=512)
    params = {k: v.astype(numpy.float32) for k, v in init_params(config, seed=0).items()}
    path = folder / "lstm-2x512.npz"
    checkpoint.save(path, checkpoint.Checkpoint(config, base.vocab, params))
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def table(rows: list[dict]):
    print("| server | clients | requests | tokens/s | TTFT p50 | TTFT p99 | per token p50 | per token p99 | errors "
          "| server CPU | clients' CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        errs = f"{r['errors']}" + (f" ({r['error_kinds']})" if r["errors"] else "")
        cpu = (f"{r['server_cpu']:.0%} ({r['server_us']:.0f} us/token) | {r['client_cpu']:.0%}"
               if "server_cpu" in r else "- | -")
        print(f"| {r['kind']} | {r['clients']} | {r['requests']} | {r['rate']:,.0f} | {r['ttft50']:.1f} ms | "
              f"{r['ttft99']:.1f} ms | {r['tpot50']:.2f} ms | {r['tpot99']:.2f} ms | {errs} | {cpu} |")


def bars(path: str, repeats: int, tokens: int, rounds: int, seconds: float, options: list):
    """The issue's bars at 16 clients, interleaved: ``repeats`` times the engine's step at N=1
    and N=16 and the server with 1 and with 16 clients, one after another (the machine is
    shared, so each ratio is taken from neighbouring measurements); every repeat and the
    medians."""
    found = []
    with serve_process(path, "--slots", "16", *options) as served:
        for k in range(repeats):
            e1 = engine_rates(path, [1])[1]
            one = server_phase(served.url, served.proc.pid, 1, rounds, tokens, seconds, "batched")
            e16 = engine_rates(path, [16])[16]
            many = server_phase(served.url, served.proc.pid, 16, rounds, tokens, seconds, "batched")
            found.append({"one": one["rate"], "many": many["rate"], "step1": e1[0], "step16": e16[0],
                          "drawn16": e16[2], "speedup": many["rate"] / one["rate"], "of_step": many["rate"] / e16[0],
                          "of_drawn": many["rate"] / e16[2], "p99": many["tpot99"] / one["tpot99"],
                          "errors": one["errors"] + many["errors"]})
            print(f"  repeat {k + 1}: 16 clients {many['rate']:,.0f} tokens/s, one {one['rate']:,.0f}, "
                  f"engine step at 16 {e16[0]:,.0f}", file=sys.stderr)
    print("| repeat | 1 client tokens/s | 16 clients tokens/s | 16 / 1 (bar 4x) | engine step N=1 | engine step N=16 "
          "| step + draw N=16 | 16 clients / step N=16 (bar 80%) | / (step + draw) | p99 per token 16 / 1 (bar < 3x) "
          "| errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, f in enumerate(found + [None], 1):
        if f is None:  # the medians
            f = {key: float(numpy.median([g[key] for g in found])) for key in found[0]}
            k = "median"
        print(f"| {k} | {f['one']:,.0f} | {f['many']:,.0f} | {f['speedup']:.2f}x | {f['step1']:,.0f} | "
              f"{f['step16']:,.0f} | {f['drawn16']:,.0f} | {f['of_step']:.0%} | {f['of_drawn']:.0%} | "
              f"{f['p99']:.2f}x | {f['errors']:g} |")


def ab(path: str, repeats: int, tokens: int, rounds: int, seconds: float, options: list, env_b: dict):
    """Two servers side by side, A (as this process's environment has it) and B (with ``env_b``
    added: a setting, or a switch a change under trial reads), both up at
    once and taking turns a phase at a time (1 client, then 16), ``repeats`` rounds, A first in
    odd rounds and B first in even ones: on a shared machine each ratio B/A comes from
    neighbouring phases. Prints every round and the medians."""
    found = {"A": [], "B": []}
    with serve_process(path, "--slots", "16", *options) as a, serve_process(path, "--slots", "16", *options,
                                                                           env=env_b) as b:
        for k in range(repeats):
            order = [("A", a), ("B", b)] if k % 2 == 0 else [("B", b), ("A", a)]
            row = {}
            for clients in (1, 16):
                for name, served in order:
                    row[name, clients] = server_phase(served.url, served.proc.pid, clients, rounds, tokens, seconds,
                                                      name)
            for name in "AB":
                one, many = row[name, 1], row[name, 16]
                found[name].append({"one": one["rate"], "many": many["rate"], "speedup": many["rate"] / one["rate"],
                                    "p99": many["tpot99"] / one["tpot99"], "us": many["server_us"],
                                    "errors": one["errors"] + many["errors"]})
            print(f"  round {k + 1}: A 16 clients {row['A', 16]['rate']:,.0f}, B {row['B', 16]['rate']:,.0f} "
                  f"tokens/s", file=sys.stderr)
    print(f"A: this environment; B: with {' '.join(f'{k}={v}' for k, v in env_b.items())}\n")
    print("| round | A 1 client | B 1 client | A 16 clients | B 16 clients | B/A 16 clients | A 16/1 | B 16/1 "
          "| A server us/token | B server us/token | A p99 16/1 | B p99 16/1 | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = list(zip(found["A"], found["B"]))
    med = {n: {key: float(numpy.median([g[key] for g in found[n]])) for key in found[n][0]} for n in "AB"}
    for k, (fa, fb) in enumerate(rows + [(med["A"], med["B"])], 1):
        label = k if k <= len(rows) else "median"
        print(f"| {label} | {fa['one']:,.0f} | {fb['one']:,.0f} | {fa['many']:,.0f} | {fb['many']:,.0f} | "
              f"{fb['many'] / fa['many']:.3f} | {fa['speedup']:.2f}x | {fb['speedup']:.2f}x | {fa['us']:.0f} | "
              f"{fb['us']:.0f} | {fa['p99']:.2f}x | {fb['p99']:.2f}x | {fa['errors'] + fb['errors']:g} |")
    ratios = [fb["many"] / fa["many"] for fa, fb in rows]
    print(f"\nB/A at 16 clients, round by round: median {numpy.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16,64", help="concurrent clients per phase [1,4,16,64]")
    ap.add_argument("--models", default="default,2x512", help="default and/or 2x512 [both]")
    ap.add_argument("--tokens", type=int, default=200, help="max_tokens of each request [200]")
    ap.add_argument("--rounds", type=int, default=4, help="requests each client makes in a phase [4]")
    ap.add_argument("--seconds", type=float, default=30.0, help="no new request after this long in a phase [30]")
    ap.add_argument("--soak", type=int, default=1000, help="requests of the memory soak (16 clients, 32 tokens "
                                                          "each; 10000 for the issue's; 0: none) [1000]")
    ap.add_argument("--sample-clients", default="1,4,16", help="clients of the charnn sample loop [1,4,16]")
    ap.add_argument("--no-sample", action="store_true", help="leave out the charnn sample loop")
    ap.add_argument("--no-single", action="store_true", help="leave out the one-slot server")
    ap.add_argument("--serve-option", action="append", default=[],
                    help="another option for charnn serve (repeatable), e.g. --serve-option=--max-queue=256")
    ap.add_argument("--bars", type=int, default=0, metavar="K",
                    help="only the issue's bars at 16 clients, K interleaved repeats per model")
    ap.add_argument("--ab", action="append", default=[], metavar="NAME=VALUE",
                    help="A/B: a second server with this variable added (repeatable), the two taking turns "
                         "at 1 and 16 clients, --bars K rounds (5 if not given) [off]")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="the load's client: raw asyncio sockets (cheap per token) or httpx [raw]")
    args = ap.parse_args()
    global CLIENT
    CLIENT = args.client
    clients = [int(c) for c in args.clients.split(",")]
    sample_clients = [] if args.no_sample else [int(c) for c in args.sample_clients.split(",")]
    most = max(clients)

    print(f"# charnn serve under load, {datetime.date.today()}, commit {commit()}, {cpu_name()}, "
          f"{os.cpu_count()} CPUs, CHARNN_PACKED={os.environ.get('CHARNN_PACKED', 'default')}")
    print(f"# {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}: {args.tokens} tokens a request, "
          f"{args.rounds} requests a client, prompt {PROMPT!r}, temperature 1, {CLIENT} client")
    with tempfile.TemporaryDirectory(prefix="charnn-serve-load-") as tmp:
        models = {}
        for name in args.models.split(","):
            if name == "default":
                path = checkpoint.default_model_path()
                size = checkpoint.load(path).config
                models[f"bundled {size.layers}x{size.hidden}"] = str(path)
            elif name == "2x512":
                models["2x512 (random weights)"] = str(build_2x512(Path(tmp)))
            else:
                ap.error(f"--models: unknown model {name!r} (default or 2x512)")
        for label, path in models.items():
            print(f"\n## {label}: {path}\n")
            if args.ab:
                env_b = dict(item.split("=", 1) for item in args.ab)
                ab(path, args.bars or 5, args.tokens, args.rounds, args.seconds, args.serve_option, env_b)
                continue
            if args.bars:
                bars(path, args.bars, args.tokens, args.rounds, args.seconds, args.serve_option)
                continue
            rows = []
            with serve_process(path, "--slots", str(most), *args.serve_option) as served:
                for c in clients:
                    rows.append(server_phase(served.url, served.proc.pid, c, args.rounds, args.tokens, args.seconds, "batched"))
                    print(f"  batched, {c} clients: {rows[-1]['rate']:,.0f} tokens/s", file=sys.stderr)
                soaked = soak(served.url, served.proc.pid, args.soak) if args.soak else None
            if not args.no_single:
                with serve_process(path, "--slots", "1", *args.serve_option) as served:
                    for c in clients:
                        rows.append(server_phase(served.url, served.proc.pid, c, args.rounds, args.tokens, args.seconds,
                                                 "one at a time"))
                        print(f"  one slot, {c} clients: {rows[-1]['rate']:,.0f} tokens/s", file=sys.stderr)
            for c in sample_clients:
                rows.append(sample_phase(path, c, max(1, args.rounds // 2), args.tokens, args.seconds))
                print(f"  charnn sample, {c} clients: {rows[-1]['rate']:,.0f} tokens/s", file=sys.stderr)
            table(rows)
            engine = engine_rates(path, clients)
            print("\n| N | engine step tokens/s | step + draw tokens/s | server (batched) tokens/s | "
                  "server / step | server / (step + draw) | CPU us/token: step, step + draw, server |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            batched = {r["clients"]: r for r in rows if r["kind"] == "batched"}
            for N, (step, step_cpu, drawn, drawn_cpu) in engine.items():
                b = batched[N]
                print(f"| {N} | {step:,.0f} | {drawn:,.0f} | {b['rate']:,.0f} | {b['rate'] / step:.0%} | "
                      f"{b['rate'] / drawn:.0%} | {step_cpu:.0f}, {drawn_cpu:.0f}, {b['server_us']:.0f} |")
            one = [r for r in rows if r["kind"] == "batched" and r["clients"] == 1]
            many = [r for r in rows if r["kind"] == "batched" and r["clients"] == 16]
            if one and many and 16 in engine:
                o, m = one[0], many[0]
                print(f"\nbars at 16 clients: aggregate {m['rate'] / o['rate']:.2f}x one client's (bar 4x); "
                      f"{m['rate'] / engine[16][0]:.0%} of the engine's batched step at N=16 (bar 80%); "
                      f"p99 per token {m['tpot99'] / o['tpot99']:.2f}x the single client's (bar under 3x)")
            if soaked:
                marks = ", ".join(f"{n}: {mib:.1f}" for n, mib in soaked["marks"])
                first = soaked["marks"][0][1] if soaked["marks"] else soaked["before"]
                last = soaked["marks"][-1][1] if soaked["marks"] else soaked["before"]
                print(f"\nsoak: {soaked['requests']:,} requests (16 clients, 32 tokens) in {soaked['seconds']:.1f} s, "
                      f"{soaked['errors']} errors; server RSS {soaked['before']:.1f} MiB before, after n requests "
                      f"(MiB) {marks}; from the first tenth to the end {last - first:+.1f} MiB")


if __name__ == "__main__":
    main()
