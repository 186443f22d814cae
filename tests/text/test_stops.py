"""Stop strings in incremental text: the earliest match using new characters, and the tail
held back while it may still begin a stop string."""

from __future__ import annotations

from kvcake.text import find_stop, partial_stop_len


def test_find_stop_basic_cases() -> None:
    assert find_stop("hello world", 0, ["world"]) == (6, 5)
    assert find_stop("hello world", 0, []) is None
    assert find_stop("hello world", 0, ["xyz"]) is None
    assert find_stop("a STOP b END", 0, ["END", "STOP"]) == (2, 4)  # the earliest wins
    assert find_stop("abcd", 0, ["bcd", "bc"]) == (1, 2)  # same start: the shorter ends first


def test_find_stop_only_looks_at_new_text() -> None:
    text = "END then more"
    assert find_stop(text, 9, ["END"]) is None  # wholly in old text: already reported
    assert find_stop("xxEN", 2, ["END"]) is None


def test_find_stop_across_increments() -> None:
    text, found = "", None
    for piece in ["The answer", " is 4", "2.\n\nUs", "er: next"]:
        start, text = len(text), text + piece
        found = find_stop(text, start, ["\n\nUser:", "###"])
        if found:
            break
    assert found == (len("The answer is 42."), len("\n\nUser:"))
    assert text[: found[0]] == "The answer is 42."


def test_partial_stop_len_holds_back_possible_stop_prefixes() -> None:
    assert partial_stop_len("The answer\n\nUs", ["\n\nUser:"]) == 4
    assert partial_stop_len("The answer", ["\n\nUser:"]) == 0
    assert partial_stop_len("ab", ["abc", "bcd"]) == 2
    assert partial_stop_len("abc", ["abc"]) == 0  # a whole stop is find_stop's business
