"""charnn serve in process: the Starlette app over a real scheduler and the bundled model,
driven through Starlette's TestClient (httpx). Real processes: test_serve_process.py."""

from __future__ import annotations

import json
import math
import time

import numpy
import pytest

from serve_support import needs_serve

pytestmark = needs_serve

from charnn.io.checkpoint import default_model_path, load_model  # noqa: E402
from charnn.sample import StopRule, generate, start_ids  # noqa: E402
from charnn.serve.limits import Limits  # noqa: E402
from charnn.serve.channel import Channel  # noqa: E402
from charnn.serve.scheduler import QueueFull, Scheduler, Sequence, widths  # noqa: E402

PROMPT = "ROMEO:"


def make_app(slots=4, limits=None, api_key=None, start=True, **kw):
    from charnn.cli.info import describe
    from charnn.serve.app import create_app

    lm, vocab, _ = load_model(default_model_path())
    scheduler = Scheduler(lm, vocab, slots=slots, queue=(limits or Limits()).queue)
    if start:
        scheduler.start()
        scheduler.ready.wait(60)
    return create_app(scheduler, "default", describe(None), 0, limits or Limits(), api_key, **kw), scheduler


@pytest.fixture(scope="module")
def served():
    from starlette.testclient import TestClient

    app, scheduler = make_app(slots=4)
    with TestClient(app) as client:
        yield client, scheduler
    scheduler.stop()
    scheduler.join(5)


@pytest.fixture(scope="module")
def lm_vocab():
    lm, vocab, _ = load_model(default_model_path())
    return lm, vocab


def run_then_stop(scheduler, run):
    """asyncio.run(run()), then the scheduler stopped whatever happened."""
    import asyncio

    try:
        return asyncio.run(run())
    finally:
        scheduler.stop()
        scheduler.join(5)


async def gather(channel, texts, count):
    """Take ``channel``'s events until ``count`` choices have ended: each piece's text added to
    texts[index]; the end events returned."""
    ends = []
    while len(ends) < count:
        for ev in await channel.take():
            if ev[0] == "piece":
                texts[ev[1]] += ev[2]
            else:
                ends.append(ev)
    return ends


def alone(lm_vocab, prompt=PROMPT, length=16, seed=0, k=0, stop=None, **kw):
    """What charnn sample --prime PROMPT --seed SEED makes for its k-th sample (stop kept)."""
    lm, vocab = lm_vocab
    return "".join(generate(lm, vocab, length, prime=prompt, rng=numpy.random.default_rng([seed, k]), stop_at=stop,
                            **kw))


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def events(text: str) -> list:
    """The data of each server-sent event, in order."""
    out = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert out[-1] == "[DONE]", out[-3:]
    return [json.loads(d) for d in out[:-1]]


def check_error(r, status, param=None, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param"}, body
    assert body["error"]["param"] == param, body
    for needle in needles:
        assert needle in body["error"]["message"], (needle, body)
    return body["error"]


# ----- the endpoints -----
def test_health_models_and_page(served):
    client, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    m = models["data"][0]
    assert m["id"] == "default" and m["object"] == "model" and m["owned_by"] == "charnn"
    assert m["charnn"]["cell"] == "lstm" and m["charnn"]["vocab"]["level"] == "char"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "<html" in page.text
    same = client.get("/static/index.html")
    assert same.status_code == 200 and same.text == page.text


def test_health_is_503_while_loading():
    from starlette.testclient import TestClient

    app, scheduler = make_app(start=False)
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        check_error(client.post("/v1/completions", json={"prompt": "a"}), 503)


@pytest.mark.parametrize("path", ["/static/../serve/app.py", "/static/..%2Fapp.py", "/static/.hidden",
                                  "/static/nothing.js", "/static/", "/static/%2e%2e"])
def test_static_never_leaves_its_folder(served, path):
    client, _ = served
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert "error" in r.json()


def test_unknown_endpoint_and_method_are_json(served):
    client, _ = served
    check_error(client.get("/v1/nothing"), 404)
    check_error(client.get("/v1/completions"), 405)


def test_seeded_completion_is_charnn_samples_text(served, lm_vocab):
    client, _ = served
    body = complete(client, model="anything", prompt=PROMPT, max_tokens=40, seed=7)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "default"
    (choice,) = body["choices"]
    assert choice["text"] == alone(lm_vocab, length=40, seed=7)
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 40, "total_tokens": len(PROMPT) + 40}


def test_choices_use_their_own_generators(served, lm_vocab):
    client, _ = served
    body = complete(client, prompt=[PROMPT, "JULIET:"], n=2, max_tokens=20, seed=3, temperature=0.8, top_k=10,
                    top_p=0.9)
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    want = [alone(lm_vocab, p, 20, 3, k=p_i * 2 + k, temperature=0.8, top_k=10, top_p=0.9)
            for p_i, p in enumerate([PROMPT, "JULIET:"]) for k in range(2)]
    assert texts == want
    assert len(set(texts)) == 4


def test_greedy_is_the_argmax(served, lm_vocab):
    client, _ = served
    body = complete(client, prompt="KING", max_tokens=30, temperature=0)
    assert body["choices"][0]["text"] == alone(lm_vocab, "KING", 30, temperature=0)


def test_stop_ends_before_the_stop_string(served, lm_vocab):
    client, _ = served
    kept = alone(lm_vocab, length=300, seed=11, stop="\n")
    assert kept.endswith("\n")  # the bundled model ends a line within 300 characters with this seed
    body = complete(client, prompt=PROMPT, max_tokens=300, seed=11, stop=["\n", "zzz"])
    choice = body["choices"][0]
    assert choice["text"] == StopRule("\n").cut(kept) == kept[:-1]
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(kept)


def test_stream_gives_the_same_text_piece_by_piece(served, lm_vocab):
    client, _ = served
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 25, "seed": 5, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    # The first piece at once, then what was made since the last event, at most an event per
    # 10 ms, the end at once: one event when the whole text was made before the first went out.
    assert 1 <= len(evs) <= 26
    assert all(e["object"] == "text_completion" and e["choices"][0]["index"] == 0 for e in evs)
    assert [e["choices"][0]["finish_reason"] for e in evs] == [None] * (len(evs) - 1) + ["length"]
    assert "".join(e["choices"][0]["text"] for e in evs) == alone(lm_vocab, length=25, seed=5)


def test_stream_usage_comes_last_when_asked(served, lm_vocab):
    """stream_options.include_usage (OpenAI's): a last event with no choices and the usage;
    the pieces are the same text. It needs "stream": true, and only include_usage is known."""
    client, _ = served
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 25, "seed": 5, "stream": True, "n": 2,
                                             "stream_options": {"include_usage": True}})
    evs = events(r.text)
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 50
    assert evs[-1]["usage"]["total_tokens"] == evs[-1]["usage"]["prompt_tokens"] + 50
    assert all("usage" not in e for e in evs[:-1])
    first = "".join(e["choices"][0]["text"] for e in evs[:-1] if e["choices"][0]["index"] == 0)
    assert first == alone(lm_vocab, length=25, seed=5)
    for bad, field in (({"stream_options": {"include_usage": True}}, "stream_options"),
                       ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
                       ({"stream": True, "stream_options": {"other": 1}}, "stream_options"),
                       ({"stream": True, "stream_options": []}, "stream_options")):
        r = client.post("/v1/completions", json={"prompt": PROMPT, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (bad, r.text)


def test_stream_holds_back_a_possible_stop_string(served, lm_vocab):
    client, _ = served
    # a seed whose text meets the stop within 400 characters (which one depends on the model)
    found = next(((k, text) for k in range(40) if (text := alone(lm_vocab, length=400, seed=k, stop=".\n"))
                  .endswith(".\n")), None)
    assert found, "no seed of 40 meets the stop within 400 characters"
    seed, kept = found
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 400, "seed": seed, "stream": True,
                                             "stop": ".\n"})
    evs = events(r.text)
    pieces = [e["choices"][0]["text"] for e in evs]
    assert "".join(pieces) == kept[:-2]
    assert evs[-1]["choices"][0]["finish_reason"] == "stop"
    # every "." was held back until the next character showed it was no stop
    sent = ""
    for p in pieces[:-1]:
        sent += p
        assert not sent.endswith(".") or "".join(pieces).startswith(sent)


def test_logprobs(served, lm_vocab):
    client, _ = served
    body = complete(client, prompt=PROMPT, max_tokens=10, seed=1, logprobs=3)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 10
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert lp["text_offset"] == list(range(10))
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen <= 0 and len(top) == 3 and max(top.values()) >= chosen - 1e-9
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


def test_score_is_charnn_score_jsonl(served):
    from click.testing import CliRunner

    from charnn.cli import cli

    client, _ = served
    text = "To be, or not to be, that is the question.\n\nROMEO: hello there\nwith an é unknown\n"
    for tokens in (False, True):
        args = ["score", "-", "--format", "jsonl", "-q"] + (["--tokens"] if tokens else [])
        result = CliRunner().invoke(cli, args, input=text)
        assert result.exit_code == 0, result.output
        lines = [json.loads(x) for x in result.stdout.splitlines()]
        r = client.post("/v1/score", json={"input": text, "tokens": tokens})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "score" and body["model"] == "default"
        summary = dict(lines[-1])
        del summary["summary"]
        assert body["data"] == lines[:-1]
        assert body["summary"] == summary
    listed = client.post("/v1/score", json={"input": ["To be, or not to be, that is the question.", "", "ROMEO: hello there"]}).json()
    assert [d["logprob"] for d in listed["data"]] == [d["logprob"] for d in body["data"][:2]]


def test_metrics(served):
    client, _ = served
    complete(client, prompt=PROMPT, max_tokens=5, seed=1)
    text = client.get("/metrics").text
    for name in ("charnn_requests_total", "charnn_tokens_generated_total", "charnn_tokens_per_second",
                 "charnn_slots_busy", "charnn_queue_length", "charnn_slots"):
        assert name in text, name
    tokens = [line for line in text.splitlines() if line.startswith("charnn_tokens_generated_total")]
    assert float(tokens[0].split()[-1]) >= 5
    assert 'charnn_requests_total{endpoint="/v1/completions",status="200"}' in text


# ----- bad requests -----
BAD = [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ('"text"', None, "JSON object"),
    ('{"prompt": "ab", "max_tokens": NaN}', None, "NaN"),
    ('{"prompt": "ab", "temperature": Infinity}', None, "Infinity"),
    ('{"prompt": "ab", "temperature": -Infinity}', None, "Infinity"),
    ('{"prompt": "ab", "temperature": 1e999}', "temperature", "finite"),
    ('{"prompt": "ab", "max_tokens": 1' + "0" * 5000 + '}', None, "not valid JSON"),
    (b'{"prompt": "\xff"}', None, "UTF-8"),
]
BAD_FIELDS = [
    ({}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [1, 2]}, "prompt", "string"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": ["ab", ""]}, "prompt", "empty"),
    ({"prompt": "ab\u20ac\u00e9"}, "prompt", "'é', '€'"),
    ({"prompt": "ab", "max_tokens": -1}, "max_tokens", "between"),
    ({"prompt": "ab", "max_tokens": 0}, "max_tokens", "between"),
    ({"prompt": "ab", "max_tokens": 10**12}, "max_tokens", "--max-tokens"),
    ({"prompt": "ab", "max_tokens": "16"}, "max_tokens", "integer"),
    ({"prompt": "ab", "max_tokens": 16.5}, "max_tokens", "integer"),
    ({"prompt": "ab", "max_tokens": True}, "max_tokens", "integer"),
    ({"prompt": "ab", "temperature": -0.5}, "temperature", "at least"),
    ({"prompt": "ab", "temperature": 1e300}, "temperature", "at most"),
    ({"prompt": "ab", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "ab", "top_p": 0}, "top_p", "above"),
    ({"prompt": "ab", "top_p": 1.5}, "top_p", "at most"),
    ({"prompt": "ab", "top_k": 0}, "top_k", "between"),
    ({"prompt": "ab", "n": 0}, "n", "between"),
    ({"prompt": "ab", "n": 10**6}, "n", "--max-n"),
    ({"prompt": ["ab"] * 9, "n": 2}, "n", "--max-n"),
    ({"prompt": "ab", "seed": -1}, "seed", "between"),
    ({"prompt": "ab", "seed": 2**70}, "seed", "between"),
    ({"prompt": "ab", "seed": 1.5}, "seed", "integer"),
    ({"prompt": "ab", "stop": 3}, "stop", "string"),
    ({"prompt": "ab", "stop": ["a", None]}, "stop", "string"),
    ({"prompt": "ab", "stop": ["a", "b", "c", "d", "e"]}, "stop", "--max-stop"),
    ({"prompt": "ab", "stop": "x" * 1001}, "stop", "1,001 characters"),
    ({"prompt": "ab", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "ab", "logprobs": 6}, "logprobs", "between"),
    ({"prompt": "ab", "model": 3}, "model", "string"),
    ({"prompt": "ab", "file": "/etc/passwd"}, "file", "unknown field"),
    ({"prompt": "ab", "echo": True}, "echo", "unknown field"),
    ({"prompt": "a" * 5000}, "prompt", "--max-prompt-tokens"),
]
BAD_SCORES = [
    ({}, "input", "required"),
    ({"input": 3}, "input", "string"),
    ({"input": ["a", 3]}, "input", "string"),
    ({"input": ["a\nb"]}, "input", "newline"),
    ({"input": "\n  \n"}, "input", "blank"),
    ({"input": "ab", "tokens": "yes"}, "tokens", "true or false"),
    ({"input": "ab", "path": "x"}, "path", "unknown field"),
    ({"input": "ab " * 40000}, "input", "--max-score-tokens"),
]


@pytest.mark.parametrize("raw,param,needle", BAD)
def test_malformed_bodies(served, raw, param, needle):
    client, _ = served
    data = raw if isinstance(raw, bytes) else raw.encode()
    check_error(client.post("/v1/completions", content=data), 400, param, needle)
    r = client.post("/v1/score", content=data)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("body,param,needle", BAD_FIELDS)
def test_bad_completion_fields(served, body, param, needle):
    client, _ = served
    check_error(client.post("/v1/completions", json=body), 400, param, needle)
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("body,param,needle", BAD_SCORES)
def test_bad_score_fields(served, body, param, needle):
    client, _ = served
    check_error(client.post("/v1/score", json=body), 400, param, needle)


def test_body_size_limit():
    from starlette.testclient import TestClient

    app, scheduler = make_app(slots=1, limits=Limits(max_body=200))
    try:
        with TestClient(app) as client:
            big = {"prompt": "a" * 300}
            check_error(client.post("/v1/completions", json=big), 413, None, "--max-body")
            check_error(client.post("/v1/score", json={"input": "a" * 300}), 413, None, "--max-body")

            def chunks():  # no Content-Length: counted as it arrives
                yield b'{"prompt": "'
                for _ in range(10):
                    yield b"a" * 50
                yield b'"}'

            check_error(client.post("/v1/completions", content=chunks()), 413, None, "--max-body")
            assert complete(client, prompt="ab", max_tokens=2)["choices"][0]["finish_reason"] == "length"
    finally:
        scheduler.stop()


def test_queue_full_is_503_with_retry_after():
    from starlette.testclient import TestClient

    app, scheduler = make_app(slots=2, limits=Limits(queue=1), start=False)
    scheduler.ready.set()  # the worker is not running: what is submitted stays where it is
    scheduler.submit([Sequence(index=i, ids=numpy.array([0]), prompt="a", max_tokens=1) for i in range(3)])
    with pytest.raises(QueueFull):
        scheduler.submit([Sequence(index=0, ids=numpy.array([0]), prompt="a", max_tokens=1)])
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "ab"})
        check_error(r, 503, None, "busy")
        assert r.headers["retry-after"] == "1"


def test_time_limit():
    from starlette.testclient import TestClient

    app, scheduler = make_app(slots=1, limits=Limits(time_limit=0.2))
    try:
        with TestClient(app) as client:
            body = {"prompt": PROMPT, "max_tokens": 4096, "temperature": 0}
            check_error(client.post("/v1/completions", json=body), 408, None, "--time-limit")
            r = client.post("/v1/completions", json={**body, "stream": True})
            data = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert data[-1] == "data: [DONE]" and "--time-limit" in json.loads(data[-2][6:])["error"]["message"]
            assert complete(client, prompt="ab", max_tokens=3)["usage"]["completion_tokens"] == 3
    finally:
        scheduler.stop()


def test_api_key():
    from starlette.testclient import TestClient

    app, scheduler = make_app(slots=1, api_key="s3cret")
    try:
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/").status_code == 200
            assert client.get("/static/index.html").status_code == 200
            for path in ("/v1/models", "/metrics"):
                e = check_error(client.get(path), 401)
                assert e["type"] == "authentication_error"
                check_error(client.get(path, headers={"Authorization": "Bearer wrong"}), 401)
                check_error(client.get(path, headers={"Authorization": "s3cret"}), 401)
                assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
            check_error(client.post("/v1/completions", json={"prompt": "ab"}), 401)
            r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2},
                            headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
    finally:
        scheduler.stop()


# ----- the scheduler -----
def test_widths():
    assert widths(1) == [1]
    assert widths(16) == [1, 2, 4, 8, 16]
    assert widths(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("plan", ["batched", "single", "alternating", "packed"])
def test_each_plan_gives_each_sequence_its_own_text(lm_vocab, plan, monkeypatch):
    """Eight seeded sequences joining at different times, under either plan (or the two in
    turns, the state moving between them at every step), each make the text it makes alone
    (sample.generate with its own generator)."""
    import asyncio

    from charnn.serve import scheduler as scheduler_module

    lm, vocab = lm_vocab
    scheduler = Scheduler(lm, vocab, slots=8).start()
    scheduler.ready.wait(60)
    monkeypatch.setattr(scheduler_module, "PROBE", 2 if plan == "alternating" else 10**9)
    for w in scheduler.cost:
        scheduler.cost[w] = 1e-9 if (w == 0) == (plan == "single") else 1.0
    if plan == "packed":  # the batched plan on the engine's packed products at every width from 2
        for w in scheduler.widths[1:]:
            scheduler._steppers[w] = lm.stepper(w, packed=True)
        if not scheduler._steppers[2].packed:
            scheduler.stop()
            pytest.skip("the packed products do not run on this CPU (AVX-512 only)")
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed", "a", "KING HENRY"] * 2

    async def run():
        channel = Channel(asyncio.get_running_loop())
        texts = {i: "" for i in range(len(prompts))}
        for i, p in enumerate(prompts):
            scheduler.submit([Sequence(index=i, ids=start_ids(vocab, p), prompt=p, max_tokens=30 + 7 * i,
                                       seed=(9, i), channel=channel)])
            await asyncio.sleep(0.003 * i)
        for ev in await gather(channel, texts, len(prompts)):
            assert ev[2] == "length"
        return texts

    texts = run_then_stop(scheduler, run)
    for i, p in enumerate(prompts):
        assert texts[i] == alone(lm_vocab, p, 30 + 7 * i, seed=9, k=i), i


@pytest.mark.parametrize("slow", ["blas", "packed"])
def test_the_warm_up_keeps_the_faster_stepper_of_each_width(lm_vocab, slow, monkeypatch):
    """At each width from 2 the warm-up times the BLAS's stepper and one on the engine's packed
    products (where the CPU runs them) and keeps the faster for good: here whichever is made
    2 ms a step slower loses."""
    lm, vocab = lm_vocab
    if not lm.stepper(2, packed=True).packed:
        pytest.skip("the packed products do not run on this CPU (AVX-512 only)")
    real = type(lm).stepper

    def stepper(model, N=1, packed=False):
        made = real(model, N, packed)
        if N >= 2 and bool(made.packed) == (slow == "packed"):
            step = made.step
            made.step = lambda ids: time.sleep(0.002) or step(ids)
        return made

    monkeypatch.setattr(type(lm), "stepper", stepper)
    scheduler = Scheduler(lm, vocab, slots=8)
    scheduler._warm()
    for w in (2, 4, 8):
        assert bool(scheduler._steppers[w].packed) == (slow == "blas"), w
        assert scheduler.cost[w] < 0.002, (w, scheduler.cost[w])


def test_cancelled_sequence_leaves(lm_vocab):
    lm, vocab = lm_vocab
    scheduler = Scheduler(lm, vocab, slots=2).start()
    scheduler.ready.wait(60)
    try:
        seq = Sequence(index=0, ids=start_ids(vocab, "ab"), prompt="ab", max_tokens=10**6)
        scheduler.submit([seq])
        deadline = time.monotonic() + 10
        while scheduler.busy == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.busy == 1
        seq.cancelled = True
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.busy == 0 and scheduler.active == []
    finally:
        scheduler.stop()
        scheduler.join(5)


def test_draw_scaled_rows_gives_each_row_the_index_of_draw_scaled(lm_vocab):
    """The scheduler's draw for a whole step (one call over the (n, V) logits) picks, for
    every row and generator, the index the command line's draw (ops.draw_scaled) picks, and
    takes one number from each generator as it does."""
    lm, _ = lm_vocab
    ops = lm.ops
    rng = numpy.random.default_rng(3)
    for n, V, spread in ((1, 65, 1.0), (16, 65, 3.0), (7, 1000, 0.5), (33, 65, 40.0)):
        logits = (rng.standard_normal((n, V)) * spread).astype(numpy.float32)
        temps = [float(t) for t in rng.choice([0.3, 0.8, 1.0, 1.7], n)]
        mine = [numpy.random.default_rng([5, r]) for r in range(n)]
        got = ops.draw_scaled_rows(logits, temps, mine)
        if got is None:
            pytest.skip("this engine has no batched draw (compiled kernels off)")
        want = []
        for r in range(n):
            ref = numpy.random.default_rng([5, r])
            want.append(ops.draw_scaled(logits[r], temps[r], ref))
            assert mine[r].random() == ref.random()  # both took exactly one number
        assert got.tolist() == want


def test_mixed_settings_in_one_batch_each_give_their_own_text(lm_vocab):
    """Sequences at a plain temperature (drawn together), greedy, top-k and top-p ones (drawn
    row by row) in the same steps: each makes the text it makes alone."""
    import asyncio

    lm, vocab = lm_vocab
    settings = [{"temperature": 1.0}, {"temperature": 0.0}, {"temperature": 0.7, "top_k": 5},
                {"temperature": 0.5}, {"temperature": 1.2, "top_p": 0.9}, {"temperature": 1.0}, {"temperature": 0.9},
                {"temperature": 1.5}]  # five at a plain temperature: at least ROWS_AT_ONCE, drawn in one call
    scheduler = Scheduler(lm, vocab, slots=8).start()
    scheduler.ready.wait(60)

    async def run():
        channel = Channel(asyncio.get_running_loop())
        scheduler.submit([Sequence(index=i, ids=start_ids(vocab, PROMPT), prompt=PROMPT, max_tokens=60, seed=(4, i),
                                   channel=channel, **kw) for i, kw in enumerate(settings)])
        texts = [""] * len(settings)
        await gather(channel, texts, len(settings))
        return texts

    texts = run_then_stop(scheduler, run)
    for i, kw in enumerate(settings):
        assert texts[i] == alone(lm_vocab, length=60, seed=4, k=i, **kw), (i, kw)


def test_channel_gathers_pieces_until_its_time_but_takes_an_end_at_once():
    """Channel.take(until): pieces wait for the time given; an end is taken at once."""
    import asyncio

    async def run():
        loop = asyncio.get_running_loop()
        ch = Channel(loop)
        ch.put(("piece", 0, "a", None))
        Channel.post([ch])
        t0 = loop.time()
        first = await ch.take(t0 + 0.2)  # a piece alone waits for the time
        waited = loop.time() - t0
        ch.put(("piece", 0, "b", None))
        Channel.post([ch])
        t1 = loop.time()
        task = asyncio.ensure_future(ch.take(t1 + 5.0))
        await asyncio.sleep(0.05)
        ch.put(("end", 0, "length"), end=True)
        Channel.post([ch])
        second = await asyncio.wait_for(task, 2.0)
        return first, waited, second, loop.time() - t1

    first, waited, second, took = asyncio.run(run())
    assert first == [("piece", 0, "a", None)] and waited >= 0.19
    assert second == [("piece", 0, "b", None), ("end", 0, "length")] and took < 2.0


def test_a_cached_prompt_gives_the_same_text(lm_vocab, monkeypatch):
    """A prompt primed once is taken from the cache the next time (no second prime), and the
    text is the same; past the cache's size the least recently used prompt goes."""
    import asyncio

    from charnn.serve import scheduler as scheduler_module

    lm, vocab = lm_vocab
    primes = []
    real = scheduler_module.prime_state
    monkeypatch.setattr(scheduler_module, "prime_state", lambda m, ids: primes.append(len(ids)) or real(m, ids))
    scheduler = Scheduler(lm, vocab, slots=4).start()
    scheduler.ready.wait(60)
    monkeypatch.setattr(scheduler_module, "PROMPT_CACHE_BYTES", 2 * scheduler._state_bytes)
    primes.clear()  # (the warm-up's)

    async def one(prompt, seed):
        channel = Channel(asyncio.get_running_loop())
        scheduler.submit([Sequence(index=0, ids=start_ids(vocab, prompt), prompt=prompt, max_tokens=40, seed=(seed, 0),
                                   channel=channel)])
        texts = [""]
        await gather(channel, texts, 1)
        return texts[0]

    async def run():
        return [await one(p, s) for p, s in (("ROMEO:", 1), ("ROMEO:", 2), ("JULIET:", 1), ("KING:", 1), ("ROMEO:", 3))]

    texts = run_then_stop(scheduler, run)
    assert texts[:2] == [alone(lm_vocab, "ROMEO:", 40, seed=1), alone(lm_vocab, "ROMEO:", 40, seed=2)]
    assert texts[2:] == [alone(lm_vocab, "JULIET:", 40, seed=1), alone(lm_vocab, "KING:", 40, seed=1),
                         alone(lm_vocab, "ROMEO:", 40, seed=3)]
    assert primes == [6, 7, 5, 6]  # ROMEO: once, JULIET:, KING:, then ROMEO: again (pushed out by the two)
