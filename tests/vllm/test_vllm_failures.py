"""vLLM instances that die under the Conductor (``kvcake up --engine vllm``): a decode
instance killed mid-stream, then a prefill instance killed mid-prefill. The client gets an
error, not a hang; what a survivor held for the request is freed; the dead sidecar's vLLM
goes with it. One cluster (1 prefill + 2 decode) for both kills, in that order: starting
vLLM instances is most of the test's time."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from vllm_cluster import LONG, VllmCluster, gauges, idle, vllm_cluster
from vllm_venv import needs_vllm

pytestmark = [needs_vllm, pytest.mark.timeout(1200)]
_BOUND_S = 60.0  # the Conductor drops a silent instance after 3 s; everything else is slack
_DECODES = ("decode-1", "decode-2")


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


def _serving_decode(cluster: VllmCluster) -> str:
    """The decode instance whose vLLM runs a request (the stream's)."""
    _until(lambda: any(_running(cluster, name) for name in _DECODES), "no decode runs")
    return next(name for name in _DECODES if _running(cluster, name))


def _running(cluster: VllmCluster, name: str) -> bool:
    return gauges(cluster.vllm_url(name)).get("vllm:num_requests_running", 0) >= 1


def test_a_decode_then_a_prefill_instance_killed_mid_request(tmp_path: Path) -> None:
    with vllm_cluster(tmp_path, decode=2) as cluster:
        survivor = _decode_killed_mid_stream(cluster)
        _prefill_killed_mid_prefill(cluster, survivor)


def _decode_killed_mid_stream(cluster: VllmCluster) -> str:
    """Kill the stream's decode instance; returns the other one."""
    prefill_url = cluster.vllm_url("prefill-0")
    started, victim = time.monotonic(), ""
    with cluster.client() as client, client.completions.create(
            model="smollm2", prompt=LONG, max_tokens=2000, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) as stream, pytest.raises(openai.APIError):
        for i, _ in enumerate(stream):
            if i == 3:
                victim = _serving_decode(cluster)
                os.kill(cluster.sidecar_pid(victim), signal.SIGKILL)
    assert victim and time.monotonic() - started < _BOUND_S
    (survivor,) = (name for name in _DECODES if name != victim)
    _until(lambda: _gone(cluster.vllm_url(victim)), "the dead sidecar's vLLM still serves")
    _until(lambda: idle(prefill_url), "the prefill instance still holds the request")
    return survivor


def _prefill_killed_mid_prefill(cluster: VllmCluster, decode: str) -> None:
    decode_url, prefill_url = cluster.vllm_url(decode), cluster.vllm_url("prefill-0")
    outcome: list[BaseException | str] = []

    def ask() -> None:
        try:
            with cluster.client() as client:
                reply = client.completions.create(
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
    with cluster.client() as client, \
            pytest.raises(openai.InternalServerError):  # no prefill instance left: 503
        client.completions.create(model="smollm2", prompt="hi", max_tokens=2)
