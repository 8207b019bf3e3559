"""The Starlette application of ``charnn serve``: ``create_app``.

Endpoints: GET /health, GET /v1/models, POST /v1/completions (OpenAI's completions API, with
server-sent events under "stream": true), POST /v1/score (charnn score's numbers), GET
/metrics (Prometheus), GET / and GET /static/{name} (the page). The model's maths runs on the
scheduler's worker thread (scheduler.py), never on the event loop. Every error a client can
cause is a 4xx with OpenAI's error object; limits are checked before any work.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import secrets
import sys
import time
import traceback
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from ..cli.common import json_line
from ..sample import StopRule
from ..score import ScoreError, score_lines, score_row, summarize
from . import request as checks
from .limits import Limits
from .request import ApiError
from .channel import Channel
from .scheduler import Closed, QueueFull, Scheduler, Sequence

STATIC = Path(__file__).parent / "static"
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                 ".ico": "image/x-icon", ".json": "application/json", ".txt": "text/plain; charset=utf-8"}
# Paths open without the API key: the health check, and the page (which asks for the key).
OPEN_PATHS = ("/health", "/", "/favicon.ico")
SCORE_BATCH = 64  # charnn score's --batch-size default: the same batches, the same numbers
SHUTDOWN_GRACE = 3.0  # seconds a stream may take to send its last events after SIGTERM
RETRY_AFTER = "1"
# A stream's events: the first at once, then at most one per EVENT_INTERVAL seconds, each with
# the text made since the last, and the interval grown so that all the streams together send
# at most about EVENT_RATE events a second (an end goes out at once). Each event costs the
# server and its client far more than a token costs the model, so a fixed event per token made
# the events, not the model, the server's limit (see benchmarks/README.md, serve_load).
EVENT_INTERVAL = 0.01
EVENT_RATE = 2000.0


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    """JSON as charnn score --format jsonl writes it (non-finite floats as null)."""
    return Response(json_line(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(e: ApiError) -> Response:
    return json_response(e.body(), e.status, e.headers)


class Held:
    """One choice's text as it streams: pieces are sent as soon as no stop string can begin in
    them (a tail that could be the start of one is held back), and the text ends before the
    stop string, as OpenAI's does."""

    def __init__(self, stops: tuple):
        self.rule = StopRule(stops)
        self.text, self.sent = "", 0
        self.tokens: list = []  # (text, logprob, top, offset) with logprobs
        self.finish: str | None = None

    def _held(self) -> int:
        text, most = self.text, 0
        for s in self.rule.stops:
            for k in range(min(len(s) - 1, len(text)), most, -1):
                if text.endswith(s[:k]):
                    most = k
                    break
        return most

    def add(self, piece: str, lp) -> str:
        if lp is not None:
            self.tokens.append((lp["token"], lp["logprob"], lp["top"], len(self.text)))
        self.text += piece
        safe = min(len(self.rule.cut(self.text)), len(self.text) - self._held())
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def end(self, reason: str) -> str:
        self.finish = "stop" if reason == "stop" else "length"
        if reason == "stop":
            self.text = self.rule.cut(self.text)
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out

    def logprobs(self, tokens=None):
        tokens = self.tokens if tokens is None else tokens
        tokens = [t for t in tokens if t[3] < len(self.text) or not self.text]
        return {"tokens": [t[0] for t in tokens], "token_logprobs": [t[1] for t in tokens],
                "top_logprobs": [t[2] for t in tokens], "text_offset": [t[3] for t in tokens]}


class Metrics:
    """The Prometheus metrics of one app (its own registry, so several apps can live in one
    process, as the tests make them)."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("charnn_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.tokens = Counter("charnn_tokens_generated", "Tokens generated", registry=r)
        Gauge("charnn_tokens_per_second", "Tokens generated per second over the last second or more",
              registry=r).set_function(self.rate)
        Gauge("charnn_slots", "Sequences decoded together at most", registry=r).set(scheduler.slots)
        Gauge("charnn_slots_busy", "Slots in use", registry=r).set_function(lambda: scheduler.busy)
        Gauge("charnn_queue_length", "Sequences waiting for a slot", registry=r).set_function(
            lambda: scheduler.waiting)
        self._window, self._since, self._rate = 0, time.monotonic(), 0.0

    def on_step(self, tokens: int, seconds: float):
        """Called on the worker after each step."""
        self.tokens.inc(tokens)
        self._window += tokens
        now = time.monotonic()
        if now - self._since >= 1.0:
            self._rate = self._window / (now - self._since)
            self._window, self._since = 0, now

    def rate(self) -> float:
        """The last second's rate; 0 once no step has come for two seconds."""
        return self._rate if time.monotonic() - self._since < 2.0 else 0.0


class Service:
    """The endpoints' shared state: the scheduler, the model's name and facts, the limits."""

    def __init__(self, scheduler: Scheduler, name: str, info: dict, created: int, limits: Limits,
                 api_key: str | None, static_dir: Path):
        self.scheduler, self.name, self.info, self.created = scheduler, name, info, created
        self.limits, self.static_dir = limits, Path(static_dir)
        self.key = None if not api_key else api_key.encode("utf-8")
        self.vocab = scheduler.vocab
        self.draining = False
        self.streams = 0  # streamed requests open (their event interval grows with them)
        self.metrics = Metrics(scheduler)
        scheduler.on_step = self.metrics.on_step

    # ----- shared checks -----
    async def body(self, request: Request) -> dict:
        """The JSON object of a body of at most max_body bytes, read within the time limit."""
        limit = self.limits.max_body
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "Content-Length is not a number")
            if int(declared) > limit:
                raise ApiError(413, f"the body is {int(declared):,} bytes, more than {limit:,} (charnn serve --max-body)")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the body is more than {limit:,} bytes (charnn serve --max-body)")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.limits.time_limit)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.limits.time_limit:g} s "
                                f"(charnn serve --time-limit)") from None
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the body") from None
        return checks.parse_json(b"".join(chunks))

    def ready(self):
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="server_unavailable",
                           headers={"Retry-After": RETRY_AFTER})
        if not self.scheduler.ready.is_set() or self.scheduler.failed:
            raise ApiError(503, "the model is still loading", type="server_unavailable",
                           headers={"Retry-After": RETRY_AFTER})

    # ----- endpoints -----
    async def health(self, request):
        if self.draining:
            return json_response({"status": "stopping"}, 503)
        if not self.scheduler.ready.is_set():
            return json_response({"status": "loading"}, 503)
        if self.scheduler.failed:
            return json_response({"status": "error", "message": self.scheduler.failed}, 503)
        return json_response({"status": "ok"})

    async def models(self, request):
        return json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "charnn", "charnn": self.info}]})

    async def metrics_text(self, request):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(self, request):
        return self._static_file("index.html")

    async def static(self, request):
        return self._static_file(request.path_params["name"])

    def _static_file(self, name: str):
        if not STATIC_NAME.match(name) or name not in _listing(self.static_dir):
            raise ApiError(404, f"no such file: {name!r}", type="not_found")
        path = self.static_dir / name
        return FileResponse(path, media_type=CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    async def score(self, request):
        obj = await self.body(request)
        lines, with_tokens = checks.score(obj, self.vocab, self.limits)
        self.ready()

        def job(model, vocab):
            return score_lines(model, vocab, lines, batch_size=SCORE_BATCH, with_tokens=with_tokens)

        try:
            items = await asyncio.wrap_future(self.scheduler.run(job))
        except Closed:
            raise ApiError(503, "the server is shutting down", type="server_unavailable") from None
        except ScoreError as e:
            raise ApiError(400, str(e), "input") from None
        summary = summarize(items)
        del summary["summary"]
        return json_response({"object": "score", "model": self.name,
                              "data": [score_row(s, n, with_tokens) for n, s in enumerate(items, 1)],
                              "summary": summary})

    async def completions(self, request):
        obj = await self.body(request)
        req = checks.completion(obj, self.vocab, self.limits)
        self.ready()
        channel = Channel(asyncio.get_running_loop())
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        deadline = time.monotonic() + self.limits.time_limit
        seqs = []
        for p, (text, ids) in enumerate(req.prompts):
            for k in range(req.n):
                index = p * req.n + k
                seqs.append(Sequence(index=index, ids=ids, prompt=text, max_tokens=req.max_tokens,
                                     temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                     seed=(seed, index), stops=req.stops, logprobs=req.logprobs,
                                     deadline=deadline, channel=channel))
        try:
            self.scheduler.submit(seqs)
        except QueueFull as e:
            raise ApiError(503, f"{e}; try again shortly", type="server_busy",
                           headers={"Retry-After": RETRY_AFTER}) from None
        except Closed:
            raise ApiError(503, "the server is shutting down", type="server_unavailable") from None
        head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        prompt_tokens = sum(len(ids) for _, ids in req.prompts)
        if req.stream:
            # send_timeout: a client that stops reading is dropped after the time limit.
            return EventSourceResponse(self._stream(seqs, channel, head, req, prompt_tokens), ping=15, sep="\n",
                                       shutdown_grace_period=SHUTDOWN_GRACE, send_timeout=self.limits.time_limit)
        return await self._collect(request, seqs, channel, head, req, prompt_tokens)

    async def _stream(self, seqs, channel, head, req, prompt_tokens: int):
        """The events of a streamed request, written as bytes (several events may go in one
        write): the first piece at once, then each choice's text made since its last event,
        at most one event per interval (EVENT_INTERVAL, longer with many streams open), an end
        at once. With logprobs, one event a token (in the same writes)."""
        held = [Held(req.stops) for _ in seqs]
        prefix = _prefix(head)
        loop = channel.loop
        made, timed_out, until = 0, False, None
        self.streams += 1
        try:
            remaining = len(seqs)
            while remaining and not timed_out:
                events = await channel.take(until)
                out: list = []  # this write's events
                pending: dict = {}  # choice -> its pieces since its last event
                for ev in events:
                    i = ev[1]
                    if ev[0] == "piece":
                        made += 1
                        if ev[3] is None:
                            pending.setdefault(i, []).append(ev[2])
                        else:
                            h = held[i]
                            out.append(_chunk(prefix, i, h.add(ev[2], ev[3]), None, h.logprobs(h.tokens[-1:])))
                        continue
                    remaining -= 1
                    h = held[i]
                    text = h.add("".join(pending.pop(i)), None) if i in pending else ""
                    if ev[2] == "timeout":
                        if text:
                            out.append(_chunk(prefix, i, text, None, None))
                        out.append(json.dumps({"error": {"message": f"the request took longer than "
                                                                    f"{self.limits.time_limit:g} s (charnn serve "
                                                                    f"--time-limit)",
                                                         "type": "timeout", "param": None}}))
                        timed_out = True
                        break
                    out.append(_chunk(prefix, i, text + h.end(ev[2]), h.finish, None))
                for i, pieces in ({} if timed_out else pending).items():
                    text = held[i].add("".join(pieces), None)
                    if text or until is None:  # (the first: a held-back piece still sends its "" event)
                        out.append(_chunk(prefix, i, text, None, None))
                if remaining == 0 and not timed_out:
                    if req.include_usage:
                        out.append(json.dumps({**head, "choices": [], "usage": {
                            "prompt_tokens": prompt_tokens, "completion_tokens": made,
                            "total_tokens": prompt_tokens + made}}))
                if timed_out or remaining == 0:
                    out.append("[DONE]")
                if out:
                    yield "".join(f"data: {e}\n\n" for e in out).encode("utf-8")
                until = loop.time() + max(EVENT_INTERVAL, self.streams / EVENT_RATE)
        finally:
            self.streams -= 1
            for seq in seqs:
                seq.cancelled = True

    async def _collect(self, request, seqs, channel, head, req, prompt_tokens):
        held = [Held(req.stops) for _ in seqs]

        async def gather():
            remaining = len(seqs)
            made = 0
            while remaining:
                for ev in await channel.take(math.inf):  # (woken for the ends only)
                    h = held[ev[1]]
                    if ev[0] == "piece":
                        h.add(ev[2], ev[3])
                        made += 1
                        continue
                    remaining -= 1
                    if ev[2] == "timeout":
                        raise ApiError(408, f"the request took longer than {self.limits.time_limit:g} s "
                                            f"(charnn serve --time-limit)", type="timeout")
                    h.end(ev[2])
            return made

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            for seq in seqs:
                seq.cancelled = True
        if work not in done:
            return Response(status_code=499)  # nobody is listening
        made = work.result()
        choices = [{"index": i, "text": h.text, "finish_reason": h.finish,
                    "logprobs": h.logprobs() if req.logprobs is not None else None} for i, h in enumerate(held)]
        return json_response({**head, "choices": choices,
                              "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": made,
                                        "total_tokens": prompt_tokens + made}})


def _prefix(head: dict) -> str:
    """The start of every event's JSON of one request (its id, object, created, model), written
    once: an event a token on a busy server, so each event writes only what changes."""
    return json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": [{"index": '


def _chunk(prefix: str, index, text, finish, logprobs) -> str:
    return (f'{prefix}{index}, "text": {json.dumps(text, ensure_ascii=False)}, "finish_reason": '
            f'{json.dumps(finish)}, "logprobs": {json.dumps(logprobs, ensure_ascii=False)}}}]}}')


async def _disconnected(request: Request):
    """Returns when the client has gone (the body is read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _listing(folder: Path) -> set:
    try:
        return {p.name for p in folder.iterdir() if p.is_file()}
    except OSError:
        return set()


class Gate:
    """ASGI middleware in front of every endpoint: the API key (constant-time comparison; 401),
    and the requests counter by endpoint and status."""

    ENDPOINTS = {"/health", "/v1/models", "/v1/completions", "/v1/score", "/metrics", "/"}

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.ENDPOINTS else "/static" if path.startswith("/static/") else "other"
        status = {"code": 500}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.service.key is not None and not (path in OPEN_PATHS or path.startswith("/static/")):
                if not self._authorised(scope):
                    response = error_response(ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                                       type="authentication_error",
                                                       headers={"WWW-Authenticate": "Bearer"}))
                    return await response(scope, receive, counted)
            await self.app(scope, receive, counted)
        finally:
            self.service.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _authorised(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        # compare_digest in any case, so the time taken says nothing of the key
        ok = hmac.compare_digest(token.strip(), self.service.key)
        return ok and scheme.lower() == b"bearer"


async def _api_error(request, e: ApiError):
    return error_response(e)


async def _http_error(request, e: HTTPException):
    kind = "not_found" if e.status_code == 404 else "invalid_request_error"
    message = {404: f"no such endpoint: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    return error_response(ApiError(e.status_code, message, type=kind, headers=dict(e.headers or {})))


async def _server_error(request, e: Exception):
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    return error_response(ApiError(500, "internal error (the server's log says more)", type="server_error"))


def create_app(scheduler: Scheduler, name: str, info: dict | None = None, created: int | None = None,
               limits: Limits | None = None, api_key: str | None = None, static_dir=STATIC) -> Starlette:
    """The Starlette app over a started ``scheduler``.

    Args:
        scheduler: owns the model (started by the caller; /health is 503 until it is ready).
        name: the model's id in the API.
        info: what ``charnn info --json`` says of the model (GET /v1/models).
        created: the model's time (Unix seconds) for /v1/models.
        limits: request limits (Limits() defaults).
        api_key: when set, every endpoint but /health and the page needs ``Authorization: Bearer KEY``.
        static_dir: the page's folder.

    The app's ``state.service`` is the Service (``service.draining = True`` makes it refuse new
    work while it shuts down).
    """
    service = Service(scheduler, name, info or {}, int(created if created is not None else time.time()),
                      limits or Limits(), api_key, static_dir)
    routes = [
        Route("/health", service.health, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
        Route("/v1/score", service.score, methods=["POST"]),
        Route("/metrics", service.metrics_text, methods=["GET"]),
        Route("/", service.index, methods=["GET"]),
        Route("/static/{name}", service.static, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Gate, service=service)],
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.service = service
    return app
