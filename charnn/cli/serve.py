"""`charnn serve`: a model behind HTTP (charnn/serve). The command and its runner; the serve
stack is imported inside the runner, so the rest of the command line never needs it."""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import click

from ..serve.limits import Limits
from ..backend import DEVICES
from .common import Finite

DEFAULTS = Limits()
STACK = ("starlette", "uvicorn", "sse_starlette", "prometheus_client")
SHUTDOWN_TIMEOUT = 3  # seconds uvicorn waits for connections after SIGTERM before it cuts them


@click.command("serve", epilog="""\b
Examples:
  charnn serve                                   the bundled model on http://127.0.0.1:8080/
  charnn serve runs/small --port 9000 --slots 32
  CHARNN_API_KEY=secret charnn serve --host 0.0.0.0
  curl -s localhost:8080/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "ROMEO:", "max_tokens": 100, "seed": 1}'""")
@click.argument("model", required=False, type=click.Path(dir_okay=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than the loopback warns unless an API key is set.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option("--slots", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Sequences decoded together in one batched step.")
@click.option("--api-key", envvar="CHARNN_API_KEY", default=None,
              help="Require Authorization: Bearer KEY on every endpoint but /health and the page [$CHARNN_API_KEY].")
@click.option("--queue", type=click.IntRange(min=0), default=DEFAULTS.queue, show_default=True,
              help="Sequences that may wait for a slot; past it requests get 503 with Retry-After.")
@click.option("--max-body", type=click.IntRange(min=1), default=DEFAULTS.max_body, show_default=True,
              help="Largest request body in bytes (413 past it).")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=DEFAULTS.max_prompt_tokens,
              show_default=True, help="Longest prompt in tokens.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=DEFAULTS.max_tokens, show_default=True,
              help="Largest max_tokens a completion may ask for.")
@click.option("--max-n", type=click.IntRange(min=1), default=DEFAULTS.max_n, show_default=True,
              help="Most choices in one request (n times the prompts).")
@click.option("--max-stop", type=click.IntRange(min=0), default=DEFAULTS.max_stop, show_default=True,
              help="Most stop strings in one request.")
@click.option("--max-score-tokens", type=click.IntRange(min=1), default=DEFAULTS.max_score_tokens,
              show_default=True, help="Most tokens in one /v1/score request.")
@click.option("--time-limit", type=Finite(min=0, min_open=True), default=DEFAULTS.time_limit, show_default=True,
              help="Seconds a request may take, its wait for a slot included (408 past it).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def serve_command(model, host, port, slots, api_key, queue, max_body, max_prompt_tokens, max_tokens, max_n, max_stop,
                  max_score_tokens, time_limit, device):
    """Serve MODEL (a model file or run folder; default: the bundled Shakespeare model) over
    HTTP until SIGINT or SIGTERM: an OpenAI-style POST /v1/completions (streaming with
    "stream": true), POST /v1/score, GET /v1/models, /health, /metrics, and a page at /.
    Needs the serve extra: pip install 'charnn[serve]'."""
    limits = Limits(max_body=max_body, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_n=max_n,
                    max_stop=max_stop, time_limit=time_limit, queue=queue, max_score_tokens=max_score_tokens)
    run_serve(model, host, port, slots, api_key or None, limits, device)


def model_name(model, path) -> str:
    """The model's id in the API: "default" for the bundled model, else its run folder's name
    (a folder, or a model file named as a run folder's), else the file's stem."""
    from ..io.checkpoint import BEST_NAME, LAST_NAME

    if model is None:
        return "default"
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    if p.name in (BEST_NAME, LAST_NAME):
        return p.resolve().parent.name
    return p.stem


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port), or one line naming what failed."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def run_serve(model, host, port, slots, api_key, limits: Limits, device):
    missing = []
    for name in STACK:
        try:
            __import__(name)
        except ImportError:
            missing.append(name.replace("_", "-"))
    if missing:
        raise click.ClickException(f"charnn serve needs {', '.join(missing)}: pip install 'charnn[serve]'")
    import uvicorn

    from ..serve.app import create_app
    from ..serve.scheduler import Scheduler
    from .info import describe
    from .sample import load_for_use

    lm, vocab, path = load_for_use(model, device)
    name = model_name(model, path)
    info = describe(model)
    if not is_loopback(host) and not api_key:
        click.echo(f"charnn serve: warning: serving on {host} without an API key: anyone who can reach it can "
                   f"use the model (set --api-key or CHARNN_API_KEY)", err=True)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    scheduler = Scheduler(lm, vocab, slots=slots, queue=limits.queue).start()
    created = int(Path(info["path"]).stat().st_mtime)
    app = create_app(scheduler, name, info, created, limits, api_key)
    service = app.state.service
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT)
    server = Server(config, on_exit=lambda: _drain(service, scheduler))
    shown = f"[{host}]" if ":" in host else host

    def announce():
        scheduler.ready.wait()
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if scheduler.failed:
            click.echo(f"Error: the model cannot decode: {scheduler.failed}", err=True)
            server.should_exit = True
        elif server.started:
            click.echo(f"charnn serve: http://{shown}:{bound}/ (model {name}, {slots} slot{'s' * (slots != 1)})",
                       err=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])
    _drain(service, scheduler)
    scheduler.join(2)
    if scheduler.failed:
        sys.exit(1)


def _drain(service, scheduler):
    service.draining = True
    scheduler.stop()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server whose SIGINT and SIGTERM first stop new work and end the streams in
        flight (each gets its last event and [DONE]), then shut down, and which does not raise
        the signal again once it has stopped (uvicorn does, which would end the process with
        status 130 or -15 instead of 0)."""

        def __init__(self, config, on_exit):
            super().__init__(config)
            self._on_exit = on_exit

        def handle_exit(self, sig, frame):
            self._on_exit()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server


def Server(config, on_exit):
    return _server_class()(config, on_exit)
