"""The server's limits and their defaults (charnn serve's options of the same names): a
module with no imports, so the command line reads the defaults without loading anything."""

from dataclasses import dataclass


@dataclass
class Limits:
    max_body: int = 1_000_000  # bytes of a request body (413 past it)
    max_prompt_tokens: int = 4096  # tokens of one prompt
    max_tokens: int = 4096  # max_tokens of a completion
    max_n: int = 16  # choices of one request: n times the prompts
    max_stop: int = 4  # stop strings of one request
    time_limit: float = 300.0  # seconds a request may take, its wait for a slot included
    queue: int = 64  # sequences waiting for a slot beyond the free ones
    max_score_tokens: int = 100_000  # tokens of one score request
