"""Coverage-guided fuzzing (atheris) of the two decoders every kvcake socket goes through: the
sans-I/O FrameReceiver (any bytes, split where the input says) and the msgspec codec (any bytes
against every channel's message union). Anything but ProtocolError is a finding.

    python scripts/fuzz_atheris.py -max_total_time=60      (what ``make fuzz`` runs)

Needs ``pip install atheris``; without it this says so and exits 0.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    import atheris
except ImportError:
    print("atheris is not installed (pip install atheris); skipping the atheris fuzzers")
    sys.exit(0)

from kvcake.common import codec, frames
from kvcake.common.errors import ProtocolError
from kvcake.common.frames import FrameHeader, FrameReceiver
from kvcake.transfer.messages import TransferCall
from kvcake.wire.conductor import ConductorRequest
from kvcake.wire.store import MasterRequest
from kvcake.wire.worker import WorkerRequest

# coverage from the decoders only (instrumenting every import would take in torch)
for _name, _fn in vars(FrameReceiver).items():
    if callable(_fn):
        setattr(FrameReceiver, _name, atheris.instrument_func(_fn))
frames.unpack_header = atheris.instrument_func(frames.unpack_header)
codec.decode = atheris.instrument_func(codec.decode)

MAX_PAYLOAD = 1 << 16
UNIONS: list[Any] = [MasterRequest, ConductorRequest, WorkerRequest, TransferCall]


class _Sink:
    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        assert 0 < header.payload_size <= MAX_PAYLOAD
        return None if header.request_id % 2 else memoryview(bytearray(header.length))

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        assert payload is None or len(payload) == header.payload_size


def _receive(data: bytes, piece: int) -> None:
    receiver = FrameReceiver(_Sink(), MAX_PAYLOAD)
    view = memoryview(data)
    while view:
        buffer = receiver.get_buffer()
        n = min(len(buffer), piece, len(view))
        buffer[:n] = view[:n]
        receiver.buffer_updated(n)
        view = view[n:]


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    kind = provider.ConsumeIntInRange(0, len(UNIONS))
    piece = provider.ConsumeIntInRange(1, 300)
    body = provider.ConsumeBytes(provider.remaining_bytes())
    try:
        if kind == len(UNIONS):
            _receive(body, piece)
        else:
            codec.decode(body, UNIONS[kind])
    except ProtocolError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
