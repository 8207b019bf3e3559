"""charnn serve as a real process on a free loopback port (serve_support.serve_process),
driven by httpx, raw sockets and the official openai client; the seed and score tests
against the charnn sample and charnn score commands; SIGTERM with streams in flight."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy
import pytest

from serve_support import ROOT, needs_serve, serve_env, serve_process

pytestmark = needs_serve

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def server():
    with serve_process(None, "--slots", "16") as served:
        yield served
    assert served.exit_code == 0, served.stderr()


@pytest.fixture(scope="module")
def lm_vocab():
    from charnn.io.checkpoint import default_model_path, load_model

    lm, vocab, _ = load_model(default_model_path())
    return lm, vocab


def alone(lm_vocab, prompt, length, seed, k=0, **kw):
    from charnn.sample import generate

    lm, vocab = lm_vocab
    return "".join(generate(lm, vocab, length, prime=prompt, rng=numpy.random.default_rng([seed, k]), **kw))


def charnn(*args, input=None) -> str:
    r = subprocess.run([sys.executable, "-m", "charnn", *map(str, args)], input=input, capture_output=True, text=True,
                       env=serve_env(), cwd=str(ROOT), timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def stream_text(url, body, timeout=60, headers=None) -> tuple:
    """(the streamed text, the finish reason, whether [DONE] came) of one streamed completion."""
    import httpx

    text, finish, done = "", None, False
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout,
                      headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish, done


def busy(url) -> float:
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("charnn_slots_busy"):
            return float(line.split()[-1])
    raise AssertionError("no charnn_slots_busy")


def test_ready_line_and_openai_client(server, lm_vocab):
    import openai

    assert "(model default, 16 slots)" in server.stderr()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    plain = client.completions.create(model="default", prompt=PROMPT, max_tokens=30, seed=4, temperature=0.9)
    assert plain.choices[0].text == alone(lm_vocab, PROMPT, 30, 4, temperature=0.9)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 30
    pieces = [c.choices[0].text for c in client.completions.create(model="default", prompt=PROMPT, max_tokens=30,
                                                                   seed=4, temperature=0.9, stream=True)]
    assert "".join(pieces) == plain.choices[0].text
    assert [m.id for m in client.models.list()] == ["default"]


def test_seed_gives_charnn_samples_text(server):
    import httpx

    out = charnn("sample", "--prime", PROMPT, "--seed", 21, "-n", 120, "--temperature", 0.7, "--top-p", 0.95,
                 "--json")
    want = json.loads(out)["text"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "seed": 21, "max_tokens": 120,
                                                          "temperature": 0.7, "top_p": 0.95}, timeout=60)
    assert r.json()["choices"][0]["text"] == want


def test_score_gives_charnn_scores_numbers(server):
    import httpx

    text = "To be, or not to be, that is the question.\nROMEO: But soft, what light\n\nzq xv\n"
    lines = [json.loads(x) for x in charnn("score", "-", "--format", "jsonl", "--tokens", "-q", input=text).splitlines()]
    body = httpx.post(server.url + "/v1/score", json={"input": text, "tokens": True}, timeout=60).json()
    summary = dict(lines[-1])
    del summary["summary"]
    assert body["data"] == lines[:-1] and body["summary"] == summary


def test_sixteen_streams_each_get_their_own_text(server, lm_vocab):
    bodies = [{"prompt": PROMPT if i % 2 else "JULIET:", "max_tokens": 60 + 5 * i, "seed": 100 + i,
               "temperature": 0.9} for i in range(16)]
    results = [None] * 16

    def client(i):
        results[i] = stream_text(server.url, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, b in enumerate(bodies):
        text, finish, done = results[i]
        assert done and finish == "length"
        assert text == alone(lm_vocab, b["prompt"], b["max_tokens"], b["seed"], temperature=0.9), i


def test_disconnect_mid_stream_frees_the_slot(server):
    import httpx

    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 4096, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
        assert busy(server.url) == 1
    deadline = time.monotonic() + 5
    while busy(server.url) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert busy(server.url) == 0
    assert httpx.get(server.url + "/health").status_code == 200


def test_slow_clients_leave_the_server_healthy(server, lm_vocab):
    import httpx

    host, port = server.url.split("//")[1].split(":")
    # A client that sends half its body and stalls, one that sends headers only, one that
    # reads its stream slowly: the others are served meanwhile.
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    headers_only = socket.create_connection((host, int(port)))
    headers_only.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 300, "stream": True, "seed": 1}, timeout=30) as slow:
        lines = slow.iter_lines()
        next(lines)
        time.sleep(0.3)
        text, finish, done = stream_text(server.url, {"prompt": "KING", "max_tokens": 40, "seed": 2})
        assert done and text == alone(lm_vocab, "KING", 40, 2)
        rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
    stalled.close()
    headers_only.close()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_bad_requests_over_http(server):
    import httpx

    url = server.url + "/v1/completions"
    cases = [
        (dict(content=b"{broken"), 400),
        (dict(content=b'{"prompt": "ab", "max_tokens": NaN}'), 400),
        (dict(json={"prompt": "ab", "nope": 1}), 400),
        (dict(content=b"x" * 1_000_001), 413),
    ]
    for kwargs, status in cases:
        try:
            r = httpx.post(url, timeout=30, **kwargs)
        except httpx.HTTPError:  # the server may close a connection whose body it refused
            continue
        assert r.status_code == status, (kwargs.keys(), r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param"}
    # A declared length past the limit is refused before the body is read.
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{")
        sock.settimeout(10)
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_api_key_process():
    import httpx
    import openai

    with serve_process(None, "--slots", "2", env={"CHARNN_API_KEY": "k3y"}) as served:
        assert httpx.get(served.url + "/health").status_code == 200
        assert httpx.get(served.url + "/v1/models").status_code == 401
        assert httpx.get(served.url + "/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).completions.create(
                model="m", prompt="ab", max_tokens=2)
        ok = openai.OpenAI(base_url=served.url + "/v1", api_key="k3y", max_retries=0).completions.create(
            model="m", prompt="ab", max_tokens=2)
        assert ok.usage.completion_tokens == 2
    assert served.exit_code == 0


def test_sigterm_ends_streams_in_flight_and_exits_0():
    with serve_process(None, "--slots", "4", "--max-tokens", "1000000") as served:
        results = [None] * 3
        started = threading.Barrier(4)

        def client(i):
            import httpx

            text, finish, done = "", None, False
            with httpx.stream("POST", served.url + "/v1/completions",
                              json={"prompt": PROMPT, "max_tokens": 1000000, "stream": True}, timeout=30) as r:
                for n, line in enumerate(r.iter_lines()):
                    if n == 4:
                        started.wait(10)
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        finish = choice["finish_reason"] or finish
            results[i] = (text, finish, done)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait(30)
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(10)
        took = time.monotonic() - t0
        for t in threads:
            t.join(10)
    assert served.exit_code == 0, served.stderr()
    assert took < 5, took
    for text, finish, done in results:
        assert done and finish == "length" and len(text) > 0
    assert "Traceback" not in served.stderr()


def test_missing_serve_stack_is_one_line(monkeypatch):
    from click.testing import CliRunner

    from charnn.cli import cli

    monkeypatch.setitem(sys.modules, "sse_starlette", None)
    result = CliRunner().invoke(cli, ["serve", "--port", "0"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["Error: charnn serve needs sse-starlette: pip install 'charnn[serve]'"]


def test_another_host_warns_without_a_key():
    from charnn.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


def test_model_names_and_bad_models(tmp_path):
    from click.testing import CliRunner

    from charnn.cli import cli
    from charnn.cli.serve import model_name

    assert model_name(None, "models/default/model.npz") == "default"
    assert model_name("runs/small", "runs/small/model.npz") == "small"
    assert model_name("runs/small/last.npz", "runs/small/last.npz") == "small"
    assert model_name("exported.safetensors", "exported.safetensors") == "exported"
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "nothing"), "--port", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and "nothing" in result.stderr


def test_a_port_in_use_is_one_line():
    from click.testing import CliRunner

    from charnn.cli import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--port", str(port)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port}")
