"""Entry point of ``kvcake conductor``: instance RPC plus the OpenAI API, until signalled."""

from __future__ import annotations

from pathlib import Path

from kvcake.api import ApiServer, build_app
from kvcake.common.aio import run_main, until_signalled
from kvcake.common.log import get_logger
from kvcake.conductor.config import ConductorServerConfig
from kvcake.conductor.frontend import ConductorBackend
from kvcake.conductor.server import ConductorServer
from kvcake.conductor.types import ConductorConfig
from kvcake.model.files import resolve_model
from kvcake.text.tokenizer import Tokenizer

log = get_logger(__name__)


def served_name(config: ConductorServerConfig) -> str:
    """What clients put in ``model``: the configured name, else the model as given."""
    return config.served_model_name or Path(config.model).name.removesuffix(".gguf")


def run_conductor(config: ConductorServerConfig, policy: ConductorConfig) -> None:
    run_main(_main(config, policy))


async def _main(config: ConductorServerConfig, policy: ConductorConfig) -> None:
    files = resolve_model(config.model, config.cache_dir or None)
    tokenizer = Tokenizer.from_dir(files.path)
    server = ConductorServer(config, policy)
    rpc_endpoint = await server.startup()
    backend = ConductorBackend(server, tokenizer, served_name(config))
    app = build_app(backend, config.api_key or None, config.max_body_bytes)
    api = ApiServer(app, config.host, config.port, keep_alive_s=config.keep_alive_s)
    try:
        endpoint = await api.startup()
        print(f"kvcake conductor: OpenAI API on http://{endpoint}/v1 (model "
              f"{backend.model_name!r}), instances register at {rpc_endpoint}, policy "
              f"{policy.policy}, admission {policy.admission}", flush=True)
        await until_signalled()
    finally:
        await api.shutdown()
        await server.shutdown()
        log.info("conductor stopped")
