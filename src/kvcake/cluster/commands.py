"""``kvcake worker``, ``kvcake conductor`` and ``kvcake up``: flags mapped onto configs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from kvcake.cli_flags import (
    ENGINE_FLAGS,
    Flag,
    add_cluster_token_flag,
    add_config_flags,
    add_server_flags,
    config_values,
    from_flags,
)
from kvcake.cluster.up import ENGINES, ClusterSpec
from kvcake.conductor.admission import ADMISSIONS
from kvcake.conductor.config import DECODE_FAILURE_CHOICES, ConductorConfig, ConductorServerConfig
from kvcake.conductor.policy import POLICIES
from kvcake.engine.config import EngineConfig
from kvcake.vllm.config import VllmInstanceConfig, VllmServerConfig
from kvcake.wire.conductor import ROLES
from kvcake.worker.config import WorkerConfig

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _cmd_worker(args: argparse.Namespace) -> int:
    from kvcake.worker.run import run_worker

    config = from_flags(args, WorkerConfig, "worker")
    engine = from_flags(args, EngineConfig, "engine")
    run_worker(config, engine, args.ready_file)
    return 0


def _add_worker(commands: Subparsers) -> None:
    worker = commands.add_parser("worker", help="an inference instance under the conductor")
    add_config_flags(worker, WorkerConfig, (
        Flag("role", choices=ROLES), "conductor", "host", "port", "instance_id",
        "reserve_timeout_s", "profile", "cpus", "nice", "send_by_layer"))
    add_config_flags(worker, EngineConfig, (
        *ENGINE_FLAGS, "store_master", "store_segment_size", "max_num_seqs",
        "max_num_batched_tokens", "plain_prefill_weights"))
    add_server_flags(worker)
    worker.set_defaults(run=_cmd_worker)


def _cmd_vllm_instance(args: argparse.Namespace) -> int:
    from kvcake.vllm.run import run_vllm_instance

    config = from_flags(args, VllmInstanceConfig, "instance")
    server = from_flags(args, VllmServerConfig, "vllm_server")
    run_vllm_instance(config, server, args.ready_file)
    return 0


def _add_vllm_instance(commands: Subparsers) -> None:
    instance = commands.add_parser(
        "vllm-instance", help="a vLLM server (started here, kvcake's connector) under the "
        "conductor")
    add_config_flags(instance, VllmInstanceConfig, (
        Flag("role", choices=ROLES), "conductor", "host", "port", "instance_id",
        "reserve_timeout_s"))
    add_config_flags(instance, VllmServerConfig, (
        "python", "model", "served_model_name", "store_master",
        Flag("port", "--vllm-port"), "block_size", "max_model_len", "max_num_seqs",
        "max_num_batched_tokens", "kv_cache_gib", "cpus"))
    add_server_flags(instance)
    instance.set_defaults(run=_cmd_vllm_instance)


def _cmd_conductor(args: argparse.Namespace) -> int:
    from kvcake.conductor.run import run_conductor

    config = from_flags(args, ConductorServerConfig, "conductor")
    # instances exchange prefixes through the store, never cache to cache
    policy = from_flags(args, ConductorConfig, "policy", pull_from_instances=False)
    run_conductor(config, policy, args.ready_file)
    return 0


_POLICY_FLAGS = (Flag("policy", help=f"routing policy: {', '.join(POLICIES)}"),
                 Flag("admission", help=f"admission rule: {', '.join(ADMISSIONS)}"),
                 "slo_ttft_s", "slo_tbt_s")


def _add_conductor(commands: Subparsers) -> None:
    conductor = commands.add_parser("conductor", help="the global scheduler and OpenAI API")
    add_config_flags(conductor, ConductorServerConfig, (
        "host", "rpc_host", "port", "rpc_port", "model", "served_model_name", "api_key",
        "store_master", "instance_ttl_s", "max_body_bytes",
        Flag("keep_alive_s", metavar="SECONDS"),
        Flag("on_decode_failure", choices=DECODE_FAILURE_CHOICES)))
    add_config_flags(conductor, ConductorConfig, (*_POLICY_FLAGS, "balancing_threshold",
                                                  "drain_fit"))
    add_server_flags(conductor)
    conductor.set_defaults(run=_cmd_conductor)


def _cmd_up(args: argparse.Namespace) -> int:
    from kvcake.cluster.up import load_spec, run_up

    values = config_values(args, ClusterSpec)
    if args.no_store:
        values["store_size"] = "0"
    return run_up(load_spec(args.config, values))


def _add_up(commands: Subparsers) -> None:
    up = commands.add_parser("up", help="a whole cluster on this machine, with the OpenAI API")
    up.add_argument("--config", help="TOML file with a [cluster] table (flags override it)")
    add_config_flags(up, ClusterSpec, (
        "host", "internal_host", "no_token", "port", "prefill", "decode", "both", "model",
        "kv_cache_size", "store_size", "store_disk_size", "store_disk_dir", "threads",
        "max_num_seqs", "max_num_batched_tokens",
        "api_key", "max_body_size", Flag("on_decode_failure", choices=DECODE_FAILURE_CHOICES),
        "log_dir", "ha", "pin", Flag("engine", choices=ENGINES), "vllm_python",
        *_POLICY_FLAGS, "drain_fit", "profile"))
    up.add_argument("--no-store", action="store_true", help="run without the KV store")
    add_cluster_token_flag(up)
    up.set_defaults(run=_cmd_up)


def add_serving_commands(commands: Subparsers) -> None:
    _add_worker(commands)
    _add_vllm_instance(commands)
    _add_conductor(commands)
    _add_up(commands)
