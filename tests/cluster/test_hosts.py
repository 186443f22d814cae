"""Two hosts (network namespaces joined by veth): the Conductor and a prefill instance on one,
the decode instance on the other, started one by one as the README shows; the prompt's KV
crosses over TCP, and asking again (now a prefix-cache hit) gives the same answer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvcake.ops import NetnsPair, ServerProcess, kvcake_command

pytestmark = pytest.mark.netns

CLIENT = """
import json, sys, urllib.request
body = json.dumps({"model": "smollm2", "prompt": sys.argv[2], "max_tokens": 12,
                   "temperature": 0, "ignore_eos": True}).encode()
request = urllib.request.Request(f"http://{sys.argv[1]}/v1/completions", body,
                                 {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as reply:
    answer = json.loads(reply.read())
with urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10) as reply:
    metrics = reply.read().decode()
sent = [l for l in metrics.splitlines() if l.startswith("kvcake_conductor_kv_transfer_bytes")]
print(json.dumps({"text": answer["choices"][0]["text"], "transfer": sent}))
"""
PROMPT = "Mooncake keeps the KV cache of long prompts in a pool spread over the cluster, so"


@pytest.fixture
def hosts() -> Iterator[NetnsPair]:
    with NetnsPair("kvcake-hosts") as pair:
        yield pair


def test_prefill_and_decode_on_two_hosts(hosts: NetnsPair) -> None:
    a = hosts.address("a")
    processes: list[ServerProcess] = []
    try:
        conductor = ServerProcess(kvcake_command(
            "conductor", "--host", a, "--port", "0", "--rpc-port", "0", prefix=hosts.prefix("a")),
            r"OpenAI API on http://(\S+)/v1.*register at (\S+),", 120, "conductor")
        processes.append(conductor)
        api, rpc = conductor.match.group(1), conductor.match.group(2)
        for side, role in (("a", "prefill"), ("b", "decode")):
            processes.append(ServerProcess(kvcake_command(
                "worker", "--role", role, "--host", hosts.address(side), "--conductor", rpc,
                "--instance-id", role, "--kv-cache-size", "32MiB", "--threads", "1",
                prefix=hosts.prefix(side)), "listening on", 120, role))
        _wait_ready(hosts, api)
        answer = _ask(hosts, api)
        transferred = float(answer["transfer"][-1].split()[-1])
        assert transferred > 0  # the prompt's KV went from host a to host b
        assert answer["text"] == _ask(hosts, api)["text"]
        assert answer["text"].strip()
    finally:
        for process in reversed(processes):
            process.stop()


def _ask(hosts: NetnsPair, api: str) -> dict[str, object]:
    result = subprocess.run([*hosts.prefix("a"), sys.executable, "-c", CLIENT, api, PROMPT],
                            capture_output=True, text=True, timeout=180, check=True)
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def _wait_ready(hosts: NetnsPair, api: str) -> None:
    check = ("import sys, time, urllib.request\n"
             "for _ in range(600):\n"
             "    try:\n"
             "        urllib.request.urlopen(f'http://{sys.argv[1]}/health', timeout=2); break\n"
             "    except Exception: time.sleep(0.2)\n"
             "else: sys.exit('not ready')\n")
    subprocess.run([*hosts.prefix("a"), sys.executable, "-c", check, api], timeout=180,
                   check=True)
