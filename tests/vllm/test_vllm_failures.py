"""vLLM instances that die under the Conductor (``kvcake up --engine vllm``): a decode
instance killed mid-stream, a prefill instance killed mid-prefill. The client gets an error,
not a hang; what the survivor held for the request is freed; the dead sidecar's vLLM goes
with it. One cluster per test: each kills an instance."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from vllm_cluster import LONG, gauges, idle, vllm_cluster
from vllm_venv import needs_vllm

pytestmark = [needs_vllm, pytest.mark.timeout(1200)]
_BOUND_S = 60.0  # the Conductor drops a silent instance after 3 s; everything else is slack


def _until(check: object, what: str) -> None:
    deadline = time.monotonic() + _BOUND_S
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _gone(url: str) -> bool:
    try:
        gauges(url)
    except OSError:
        return True
    return False


def test_decode_instance_killed_mid_stream(tmp_path: Path) -> None:
    with vllm_cluster(tmp_path) as cluster:
        decode_url, prefill_url = cluster.vllm_url("decode-1"), cluster.vllm_url("prefill-0")
        stream = cluster.client().completions.create(
            model="smollm2", prompt=LONG, max_tokens=2000, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        started = time.monotonic()
        with pytest.raises(openai.APIError):
            for i, _ in enumerate(stream):
                if i == 3:
                    os.kill(cluster.sidecar_pid("decode-1"), signal.SIGKILL)
        assert time.monotonic() - started < _BOUND_S
        _until(lambda: _gone(decode_url), "the dead sidecar's vLLM still serves")
        _until(lambda: idle(prefill_url), "the prefill instance still holds the request")
        with pytest.raises(openai.InternalServerError):  # no decode instance left: 503
            cluster.client().completions.create(model="smollm2", prompt="hi", max_tokens=2)


def test_prefill_instance_killed_mid_prefill(tmp_path: Path) -> None:
    with vllm_cluster(tmp_path) as cluster:
        decode_url, prefill_url = cluster.vllm_url("decode-1"), cluster.vllm_url("prefill-0")
        outcome: list[BaseException | str] = []

        def ask() -> None:
            try:
                reply = cluster.client().completions.create(
                    model="smollm2", prompt=LONG * 6, max_tokens=8, temperature=0)
                outcome.append(reply.choices[0].text)
            except openai.APIError as exc:
                outcome.append(exc)

        asker = threading.Thread(target=ask)
        started = time.monotonic()
        asker.start()
        _until(lambda: gauges(prefill_url).get("vllm:num_requests_running", 0) >= 1,
               "the prefill never started")
        os.kill(cluster.sidecar_pid("prefill-0"), signal.SIGKILL)
        asker.join(_BOUND_S)
        assert not asker.is_alive(), "the request hangs"
        assert isinstance(outcome[0], openai.APIError), outcome
        assert time.monotonic() - started < _BOUND_S
        _until(lambda: idle(decode_url), "the decode instance still holds the reservation")
        _until(lambda: _gone(prefill_url), "the dead sidecar's vLLM still serves")
