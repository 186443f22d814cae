"""Entry point of ``kvcake vllm-instance``: a vLLM server under the Conductor, served until
SIGINT/SIGTERM (which also stop the vLLM process it started)."""

from __future__ import annotations

from kvcake.common.aio import run_main
from kvcake.common.lifespan import Lifespan
from kvcake.vllm.config import VllmInstanceConfig, VllmServerConfig
from kvcake.vllm.instance import VllmInstanceServer


def run_vllm_instance(config: VllmInstanceConfig, server: VllmServerConfig,
                      ready_file: str = "") -> None:
    run_main(_main(config, server, ready_file))


async def _main(config: VllmInstanceConfig, server_config: VllmServerConfig,
                ready_file: str) -> None:
    async with Lifespan("vllm-instance", ready_file) as life:
        server = VllmInstanceServer(config, server_config)
        life.on_stop(f"vllm instance {server.instance_id}", server.shutdown)
        endpoint = await server.startup(life.stopping)
        await life.serve(f"kvcake vllm-instance {server.instance_id} ({config.role}, vLLM "
                         f"{server.vllm.url}, model {server_config.model}) listening on "
                         f"{endpoint}, conductor {config.conductor}",
                         {"rpc": endpoint, "vllm": server.vllm.url})
