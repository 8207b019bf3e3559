"""What clients send, checked strictly before any work: the limits, JSON bodies, and the
fields of a completion and a score request. Every refusal is an ApiError (a 4xx with
OpenAI's error shape); nothing here touches the model. No import of the serve stack."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..io.vocab import Vocab
from ..sample import SampleError, start_ids
from .limits import Limits


class ApiError(Exception):
    """A request refused: HTTP ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}


def parse_json(raw: bytes) -> dict:
    """A JSON object from a body; NaN and infinities (which Python's json reads) refused."""
    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is a 5,000-digit int
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, not {_kind(obj)}")
    return obj


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


def _unknown(obj: dict, known: set):
    for key in obj:
        if key not in known:
            raise ApiError(400, f"unknown field {key!r}", key)


def _int(obj, name, default, lo, hi, what=""):
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be an integer, not {_kind(v)}", name)
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}{what}, not {v}", name)
    return v


def _num(obj, name, default, lo, hi, lo_open=False):
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{name} must be a number, not {_kind(v)}", name)
    v = float(v)
    if not math.isfinite(v):
        raise ApiError(400, f"{name} must be a finite number", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"{name} must be {'above' if lo_open else 'at least'} {lo:g} and at most {hi:g}, "
                            f"not {v:g}", name)
    return v


def _text(v, name) -> str:
    if not isinstance(v, str):
        raise ApiError(400, f"{name} must be a string, not {_kind(v)}", name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{name} is not valid text (a lone surrogate)", name) from None
    return v


COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
                     "stream", "stream_options", "logprobs", "user"}
MAX_SEED = 2**64 - 1
MAX_LOGPROBS = 5
MAX_TEMPERATURE = 100.0
MAX_STOP_CHARS = 1000  # a stop string's length (each new piece is checked against every stop's prefixes)


@dataclass
class Completion:
    """A checked completion request: prompts with their tokens, and the settings."""

    prompts: list  # [(text, ids)]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    stops: tuple
    seed: int | None
    stream: bool
    logprobs: int | None
    include_usage: bool = False  # stream_options.include_usage: a last event with the usage


def completion(obj: dict, vocab: Vocab, limits: Limits) -> Completion:
    """Check a /v1/completions body against ``vocab`` and ``limits`` (ApiError otherwise)."""
    _unknown(obj, COMPLETION_FIELDS)
    if obj.get("model") is not None:
        _text(obj["model"], "model")
    if obj.get("user") is not None:
        _text(obj["user"], "user")
    if "prompt" not in obj or obj["prompt"] is None:
        raise ApiError(400, "prompt is required", "prompt")
    raw = obj["prompt"]
    if isinstance(raw, list):
        if not raw:
            raise ApiError(400, "prompt is an empty list", "prompt")
        texts = [_text(p, "prompt") for p in raw]
    elif isinstance(raw, str):
        texts = [_text(raw, "prompt")]
    else:
        raise ApiError(400, f"prompt must be a string or a list of strings, not {_kind(raw)}", "prompt")
    n = _int(obj, "n", 1, 1, limits.max_n, " (charnn serve --max-n)")
    if n * len(texts) > limits.max_n:
        raise ApiError(400, f"{len(texts)} prompts times n={n} is {n * len(texts)} choices, more than "
                            f"{limits.max_n} (charnn serve --max-n)", "n")
    prompts = []
    for text in texts:
        if text == "":
            raise ApiError(400, "prompt is empty (give at least one character)", "prompt")
        # A cheap bound first: a char model's tokens are at most its characters plus one.
        if vocab.level == "char" and len(text) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {len(text):,} tokens, more than {limits.max_prompt_tokens:,} "
                                f"(charnn serve --max-prompt-tokens)", "prompt")
        try:
            ids = start_ids(vocab, text, what="prompt")
        except SampleError as e:
            raise ApiError(400, str(e), "prompt") from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {len(ids):,} tokens, more than {limits.max_prompt_tokens:,} "
                                f"(charnn serve --max-prompt-tokens)", "prompt")
        prompts.append((text, ids))
    max_tokens = _int(obj, "max_tokens", 16, 1, limits.max_tokens, " (charnn serve --max-tokens)")
    temperature = _num(obj, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    if 0 < temperature < 1e-3:
        raise ApiError(400, "temperature must be 0 (greedy) or at least 0.001", "temperature")
    top_p = _num(obj, "top_p", None, 0.0, 1.0, lo_open=True)
    top_k = _int(obj, "top_k", None, 1, 2**31 - 1)
    stop = obj.get("stop")
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (_text(stop, "stop"),)
    elif isinstance(stop, list):
        stops = tuple(_text(s, "stop") for s in stop)
    else:
        raise ApiError(400, f"stop must be a string or a list of strings, not {_kind(stop)}", "stop")
    for s in stops:
        if len(s) > MAX_STOP_CHARS:
            raise ApiError(400, f"a stop string is {len(s):,} characters, more than {MAX_STOP_CHARS:,}", "stop")
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"stop holds {len(stops)} strings, more than {limits.max_stop} (charnn serve --max-stop)",
                       "stop")
    seed = _int(obj, "seed", None, 0, MAX_SEED)
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, not {_kind(stream)}", "stream")
    logprobs = _int(obj, "logprobs", None, 0, MAX_LOGPROBS)
    return Completion(prompts, max_tokens, temperature, top_p, top_k, n, stops, seed, bool(stream), logprobs,
                      _include_usage(obj.get("stream_options"), bool(stream)))


def _include_usage(options, stream: bool) -> bool:
    """OpenAI's stream_options: {"include_usage": true} asks a stream for a last event that
    holds the usage (and no choices)."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, not {_kind(options)}", "stream_options")
    if not stream:
        raise ApiError(400, "stream_options applies to a streamed request (\"stream\": true) only", "stream_options")
    for key in options:
        if key != "include_usage":
            raise ApiError(400, f"unknown field {key!r} in stream_options", "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, not {_kind(usage)}",
                       "stream_options")
    return usage


SCORE_FIELDS = {"model", "input", "tokens"}


def score(obj: dict, vocab: Vocab, limits: Limits) -> tuple:
    """Check a /v1/score body: (lines, with_tokens). A string is split into lines as charnn
    score splits a file; a list is one line each (a line holding a newline is refused)."""
    from ..io.vocab import iter_lines

    _unknown(obj, SCORE_FIELDS)
    if obj.get("model") is not None:
        _text(obj["model"], "model")
    raw = obj.get("input")
    if raw is None:
        raise ApiError(400, "input is required", "input")
    if isinstance(raw, str):
        lines = iter_lines(_text(raw, "input"))
    elif isinstance(raw, list):
        lines = [_text(x, "input") for x in raw]
        for i, line in enumerate(lines):
            if "\n" in line:
                raise ApiError(400, f"input[{i}] holds a newline: give one line per item, or a string", "input")
    else:
        raise ApiError(400, f"input must be a string or a list of strings, not {_kind(raw)}", "input")
    if not any(line.strip() for line in lines):
        raise ApiError(400, "input holds no line to score (every line is blank)", "input")
    tokens = obj.get("tokens", False)
    if not isinstance(tokens, bool):
        raise ApiError(400, f"tokens must be true or false, not {_kind(tokens)}", "tokens")
    size = sum(len(vocab.tokenize(line)) + 1 for line in lines if line.strip())
    if size > limits.max_score_tokens:
        raise ApiError(400, f"input is {size:,} tokens, more than {limits.max_score_tokens:,} "
                            f"(charnn serve --max-score-tokens)", "input")
    return lines, tokens
