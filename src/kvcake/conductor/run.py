"""Entry point of ``kvcake conductor``: instance RPC plus the OpenAI API, until signalled."""

from __future__ import annotations

from pathlib import Path

from kvcake.api import ApiServer, build_app
from kvcake.common.aio import run_main
from kvcake.common.lifespan import Lifespan
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.frontend import ConductorBackend
from kvcake.conductor.indexer import ConductorView, MooncakeIndexer
from kvcake.conductor.indexer_routes import add_indexer_routes
from kvcake.conductor.server import ConductorServer
from kvcake.model import resolve_model
from kvcake.text import Tokenizer


def served_name(config: ConductorServerConfig) -> str:
    """What clients put in ``model``: the configured name, else the model as given."""
    return config.served_model_name or Path(config.model).name.removesuffix(".gguf")


def conductor_view(server: ConductorServer, model_name: str) -> ConductorView:
    """What Mooncake's indexer API reads of a running Conductor."""
    index = server.service.index

    def salt(tenant: str) -> str:
        return f"{server.fingerprint()}/{tenant}" if server.instances else ""

    return ConductorView(model_name, server.policy.block_size, salt,
                         lambda: index.instance_ids, index.match_all, server.store.hit_blocks,
                         index.block_hashes)


def run_conductor(config: ConductorServerConfig, policy: ConductorConfig,
                  ready_file: str = "") -> None:
    run_main(_main(config, policy, ready_file))


async def _main(config: ConductorServerConfig, policy: ConductorConfig, ready_file: str) -> None:
    files = resolve_model(config.model, config.cache_dir or None)
    tokenizer = Tokenizer.from_dir(files.path)
    async with Lifespan("conductor", ready_file) as life:
        server = ConductorServer(config, policy)
        rpc_endpoint = await server.startup()
        life.on_stop("instance RPC", server.shutdown)
        backend = ConductorBackend(server, tokenizer, served_name(config))
        app = build_app(backend, config.api_key or None, config.max_body_bytes)
        indexer = MooncakeIndexer(conductor_view(server, backend.model_name))
        add_indexer_routes(app, indexer, config.api_key or None)
        life.on_stop("the indexer's feeds", indexer.close)
        api = ApiServer(app, config.host, config.port, keep_alive_s=config.keep_alive_s)
        life.on_stop("the OpenAI API", api.shutdown)
        endpoint = await api.startup()
        await life.serve(f"kvcake conductor: OpenAI API on http://{endpoint}/v1 (model "
                         f"{backend.model_name!r}), instances register at {rpc_endpoint}, "
                         f"policy {policy.policy}, admission {policy.admission}",
                         {"api": endpoint, "rpc": rpc_endpoint})
