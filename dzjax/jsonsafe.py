"""JSON from untrusted sources (delta file headers, HTTP bodies), parsed within limits.

Python's `json` recurses once per nesting level: a few thousand "[" raise RecursionError (a 500
over HTTP, a traceback from the CLI). `loads` turns that, and any malformed text, into a
`JSONLimitError` (a ValueError) that says what is wrong, and refuses values nested deeper than
`max_depth` (measured without recursion), so that no later recursive walk can fail either.
"""

from __future__ import annotations

import json

DEFAULT_MAX_DEPTH = 64


class JSONLimitError(ValueError):
    """Malformed JSON, or JSON nested deeper than allowed."""


def nesting_depth(value) -> int:
    """How deeply lists and dicts nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def loads(text: str | bytes, max_depth: int = DEFAULT_MAX_DEPTH):
    """json.loads(text), refusing nesting deeper than `max_depth`; JSONLimitError if malformed."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONLimitError(f"not UTF-8 ({e})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONLimitError(f"JSON nested too deeply; at most {max_depth} levels are allowed") \
            from None
    except json.JSONDecodeError as e:
        raise JSONLimitError(f"not valid JSON ({e})") from None
    depth = nesting_depth(value)
    if depth > max_depth:
        raise JSONLimitError(f"JSON nested {depth} levels deep; at most {max_depth} are allowed")
    return value
