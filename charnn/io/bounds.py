"""What an untrusted model file may make a loader parse before its configuration is known.

JSON costs Python far more than its text: an empty list takes about 60 bytes for its two
characters, a short string about 50 for its four, and nesting deeper than the parser's stack
raises RecursionError. So before ``json.loads`` builds anything, the text's size, its lists and
objects and its values (commas) are counted, outside string literals, and held to caps a real
model file's metadata stays far below. Both model file formats (checkpoint.py's npz and
safetensors_file.py's header and metadata) parse through :func:`parse_json`.
"""

from __future__ import annotations

import codecs
import json

import numpy

# A model file's metadata is mostly its vocabulary: a million words take about 10 MB of JSON
# and a million values; its other fields hold a few dozen lists and objects (the bundled
# model's: 9). At the caps, parsing costs a few hundred MB at most.
MAX_META = 64 << 20  # bytes of one JSON text
MAX_META_CONTAINERS = 10_000  # its lists and objects
MAX_META_VALUES = 4_000_000  # its values (elements of lists, members of objects)
_BLOCK = 1 << 18  # bytes counted at a time (a few MB of NumPy temporaries)


class BoundsError(ValueError):
    """The text is not JSON a model file holds, or is larger than one's; the message has no path."""


def one_line(e) -> str:
    return " ".join(str(e).split())[:200]


def parse_json(raw, max_bytes: int = MAX_META, max_containers: int = MAX_META_CONTAINERS,
               max_values: int = MAX_META_VALUES, unique_keys: bool = False):
    """The JSON value of ``raw`` (UTF-8 bytes or str), parsed only when within the caps.

    Args:
        unique_keys: refuse an object that names a key twice (json.loads keeps the last).

    Raises:
        BoundsError: not UTF-8, not JSON, over a cap, nested deeper than the parser's stack, or
            an integer of more than 4,300 digits; the message says which.
    """
    encoded = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(encoded) > max_bytes:
        raise BoundsError(f"{len(encoded):,} bytes, more than a model file's {max_bytes:,}")
    try:
        containers, values = structure(encoded)
        del encoded  # (a str's UTF-8 copy: only for counting)
        if containers > max_containers:
            raise BoundsError(f"{containers:,} lists and objects, more than a model file's metadata holds")
        if values > max_values:
            raise BoundsError(f"{values:,} values, more than a model file's metadata holds")
        text = raw if isinstance(raw, str) else codecs.utf_8_decode(raw, "strict", True)[0]
        return json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except BoundsError:
        raise
    except (ValueError, RecursionError) as e:
        # ValueError: not UTF-8, not JSON, or an integer of more than 4,300 digits;
        # RecursionError: nesting deeper than the parser's stack.
        raise BoundsError(one_line(e)[:80]) from None


def structure(raw) -> tuple[int, int]:
    """(lists and objects, commas) of the JSON text ``raw`` (UTF-8 bytes or a uint8 array),
    counted outside string literals, a block at a time: whatever the text, counting costs a few
    MB (stripping the strings with a regular expression first made a string object of each gap
    between two strings: 650 MB for 64 MB of ``"ab", ``). UTF-8 never puts the bytes of
    ``"``, ``\\``, ``[``, ``{`` or ``,`` inside another character's encoding.

    Up to the first byte that is not JSON the count is exact; there json.loads stops too."""
    data = numpy.frombuffer(raw, dtype=numpy.uint8) if not isinstance(raw, numpy.ndarray) else raw.reshape(-1)
    containers = commas = 0
    inside = 0  # whether the block starts inside a string
    carried = 0  # the backslashes that end the blocks before
    for start in range(0, data.size, _BLOCK):
        b = data[start: start + _BLOCK]
        q = numpy.flatnonzero(b == 34)
        bs = numpy.flatnonzero(b == 92)
        if bs.size or carried:
            # the run of backslashes ending at each backslash, then the one right before each quote
            first = numpy.ones(bs.size, dtype=bool)
            first[1:] = numpy.diff(bs) != 1
            k = numpy.arange(bs.size)
            runs = k - numpy.maximum.accumulate(numpy.where(first, k, 0)) + 1
            runs[bs - runs + 1 == 0] += carried  # runs from the block's start continue the last block's
            j = numpy.searchsorted(bs, q) - 1
            ends_here = (j >= 0) & (bs[numpy.maximum(j, 0)] == q - 1) if bs.size else numpy.zeros(q.size, dtype=bool)
            before = numpy.where(ends_here, runs[numpy.maximum(j, 0)] if bs.size else 0, 0)
            before[q == 0] = carried
            q = q[before % 2 == 0]  # the quotes that open or close a string (not escaped)
            carried = int(runs[-1]) if bs.size and bs[-1] == b.size - 1 else 0
        structural = numpy.flatnonzero((b == 91) | (b == 123) | (b == 44))
        kind = b[structural]
        outside = (numpy.searchsorted(q, structural) + inside) % 2 == 0
        containers += int(numpy.count_nonzero(outside & (kind != 44)))
        commas += int(numpy.count_nonzero(outside & (kind == 44)))
        inside = (inside + q.size) % 2
    return containers, commas


def _unique(pairs):
    d = dict(pairs)
    if len(d) < len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise BoundsError(f"the key {twice[:40]!r} appears twice")
    return d
