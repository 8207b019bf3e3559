"""How counts read in messages: "1 line", "2 lines" (never "1 lines")."""

from __future__ import annotations

IRREGULAR = {"class": "classes", "entry": "entries", "was": "were", "is": "are"}


def plural(n: int, noun: str, nouns: str | None = None, sep: bool = True) -> str:
    """``n`` and the noun in the form the count takes: plural(1, "line") == "1 line",
    plural(1200, "line") == "1,200 lines" (``sep``: thousands separators)."""
    if n == 1:
        word = noun
    else:
        word = nouns or IRREGULAR.get(noun) or noun + "s"
    return f"{n:,} {word}" if sep else f"{n} {word}"
