"""The single wire codec: control messages as msgspec structs, one encode/decode pair.

Control messages travel as msgpack; bulk bytes never do (they follow a fixed
:mod:`kvcake.common.frames` header as raw bytes). Every channel defines a tagged union of its
messages, so a decoder always knows which struct it got. Never pickle across a socket.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from kvcake.common.errors import InvalidParamsError, ProtocolError

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def encode(message: msgspec.Struct) -> bytes:
    """Serialise one control message. Raises :class:`InvalidParamsError` for text that
    UTF-8 cannot carry (a lone surrogate, say), naming the message and the character."""
    try:
        return _encoder.encode(message)
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end]
        raise InvalidParamsError(f"{type(message).__name__}: text is not valid UTF-8 "
                                 f"({bad!r} at {exc.start} of {exc.object!r})") from None


def decode(data: bytes | memoryview, message_type: type[T]) -> T:
    """Parse bytes into ``message_type`` (a struct or a tagged union of structs).

    Raises :class:`ProtocolError` naming what was wrong when the bytes do not match.
    """
    decoder = _decoders.get(message_type)
    if decoder is None:
        decoder = _decoders[message_type] = msgspec.msgpack.Decoder(message_type)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed control message: {exc}") from exc
