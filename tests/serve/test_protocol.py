"""The request bodies' own checks, without a server: every string is UTF-8 text, however deep."""

from __future__ import annotations

import pytest

from tailorlm.serve.protocol import utf8_only


def nested(depth: int, leaf: object) -> list:
    body: object = leaf
    for _ in range(depth):
        body = [body]
    return body


def test_a_lone_surrogate_is_found_at_any_depth_without_recursion():
    deep = nested(20_000, "fine")  # deeper than Python's recursion limit: a recursive walk would fail
    assert utf8_only({"extra": deep}) == {"extra": deep}
    with pytest.raises(ValueError, match=r"extra\[0\]\[0\] holds a lone surrogate"):
        utf8_only({"extra": nested(2, "\ud800")})
    with pytest.raises(ValueError, match="lone surrogate"):
        utf8_only({"extra": nested(20_000, "x\udfff")})
    with pytest.raises(ValueError, match="a key in the body holds"):
        utf8_only({"\ud83d": 1})
