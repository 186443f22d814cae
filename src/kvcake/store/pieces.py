"""Where a value's bytes lie in the caller's buffers: a value split over several buffers
(Mooncake's ``*_multi_buffers``), or byte ranges of it (``get_into_ranges``). Pure.

A *piece* is ``(value_offset, view)``: the value's bytes ``[value_offset, +len(view))`` and
the caller's buffer they come from or go to. A value of ``size`` bytes laid out over buffers
``a, b, c`` fills them in order and stops at its end::

    value   [0 ........................ size)
    pieces  (0, a)  (len a, b)  (len a + len b, c[: size - len a - len b])    c's rest unused
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcake.common.errors import ErrorCode, InvalidParamsError

Piece = tuple[int, memoryview]


def as_bytes(view: memoryview) -> memoryview:
    """``view`` as flat bytes; refused when it is not contiguous."""
    if not view.c_contiguous:
        raise InvalidParamsError("store buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def lay_out(parts: Sequence[memoryview], size: int) -> list[Piece] | None:
    """Pieces that put a ``size``-byte value into ``parts`` in order; ``None`` when they
    hold fewer than ``size`` bytes."""
    pieces: list[Piece] = []
    position = 0
    for part in parts:
        if position >= size:
            break
        take = min(part.nbytes, size - position)
        pieces.append((position, part[:take]))
        position += take
    return pieces if position >= size else None


def concatenated(parts: Sequence[memoryview]) -> list[Piece]:
    """Pieces of the value that is ``parts`` one after another (all of each)."""
    pieces: list[Piece] = []
    position = 0
    for part in parts:
        pieces.append((position, part))
        position += part.nbytes
    return pieces


def check_parts(keys: Sequence[str], parts: Sequence[Sequence[memoryview]]) -> None:
    """One list of flat byte views per key, none of them empty."""
    if len(keys) != len(parts):
        raise InvalidParamsError(f"{len(keys)} keys but {len(parts)} buffer lists")
    for key, views in zip(keys, parts, strict=True):
        for view in views:
            if not isinstance(view, memoryview) or view.format != "B" or view.ndim != 1:
                raise InvalidParamsError("store buffers must be flat byte memoryviews")
        if not views or any(v.nbytes == 0 for v in views):
            raise InvalidParamsError(f"{key!r}: empty value or buffer (size must be > 0)")


def check_keys(keys: Sequence[str]) -> list[str]:
    """``keys`` as a list, each checked to be text that UTF-8 can carry (a lone surrogate
    cannot, so no message could name it): ``INVALID_KEY`` otherwise."""
    for key in keys:
        if not isinstance(key, str):
            raise InvalidParamsError(f"key {key!r} is a {type(key).__name__}, not text",
                                     ErrorCode.INVALID_KEY)
        try:
            key.encode()
        except UnicodeEncodeError:
            raise InvalidParamsError(f"key {key!r} is not valid UTF-8 text",
                                     ErrorCode.INVALID_KEY) from None
    return list(keys)
