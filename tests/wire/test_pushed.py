"""What an instance pushes to the Conductor: outputs in a row go in one message, never more
than one message holds (the Conductor refuses a longer list, and the outputs in it would
be lost), and a prefill's completion keeps its place between them."""

from __future__ import annotations

from collections import deque

from kvcake.wire.conductor import MAX_OUTPUTS, Outputs, PrefillDone, next_pushed
from kvcake.wire.output import TokenOutput


def _outputs(count: int, first: int = 0) -> Outputs:
    return Outputs("i", [TokenOutput(f"r{first + n}", [n], [0.0], None, 4, 0, 0)
                         for n in range(count)])


def test_outputs_in_a_row_go_in_one_message_up_to_its_limit() -> None:
    done = PrefillDone("i", TokenOutput("p", [], [], None, 4, 0, 0))
    outbox: deque[Outputs | PrefillDone] = deque([
        _outputs(3), _outputs(2, 3), done, _outputs(MAX_OUTPUTS - 1, 5), _outputs(2, 9)])
    first = next_pushed(outbox)
    assert isinstance(first, Outputs)
    assert [o.request_id for o in first.outputs] == ["r0", "r1", "r2", "r3", "r4"]
    assert next_pushed(outbox) is done
    full, rest = next_pushed(outbox), next_pushed(outbox)
    assert isinstance(full, Outputs) and len(full.outputs) == MAX_OUTPUTS - 1
    assert isinstance(rest, Outputs) and len(rest.outputs) == 2
    assert not outbox
