"""``kvcake worker``, ``kvcake conductor`` and ``kvcake up``: flags mapped onto configs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from kvcake.cli_flags import (
    add_cluster_token_flag,
    add_engine_flags,
    engine_overrides,
    field_defaults,
    size_or_none,
)
from kvcake.cluster.up import ClusterSpec
from kvcake.common.config import load_config
from kvcake.conductor.config import DECODE_FAILURE_CHOICES, ConductorServerConfig
from kvcake.conductor.types import ConductorConfig
from kvcake.engine.config import EngineConfig
from kvcake.wire.conductor import ROLES
from kvcake.worker.config import WorkerConfig

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _cmd_worker(args: argparse.Namespace) -> int:
    from kvcake.worker.run import run_worker

    config = load_config(WorkerConfig, "worker", {
        "role": args.role, "conductor": args.conductor, "host": args.host, "port": args.port,
        "instance_id": args.instance_id, "reserve_timeout_s": args.reserve_timeout,
        "profile": False if args.no_profile else None, "cpus": args.cpus, "nice": args.nice})
    engine = load_config(EngineConfig, "engine", {
        **engine_overrides(args), "store_master": args.store_master,
        "store_segment_size": size_or_none(args.store_segment_size),
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens})
    run_worker(config, engine)
    return 0


def _add_worker(commands: Subparsers) -> None:
    worker = commands.add_parser("worker", help="an inference instance under the conductor")
    w, e = field_defaults(WorkerConfig), field_defaults(EngineConfig)
    worker.add_argument("--role", choices=ROLES, help=f"default {w['role']}")
    worker.add_argument("--conductor", help=f"conductor RPC HOST:PORT (default {w['conductor']})")
    worker.add_argument("--host", help=f"address to bind and advertise (default {w['host']})")
    worker.add_argument("--port", type=int, help="RPC port (default: ephemeral)")
    worker.add_argument("--instance-id", help="name at the conductor (default ROLE-PID)")
    worker.add_argument("--store-master", help="store master HOST:PORT (prefill/both: reuse "
                        "and save KV there)")
    worker.add_argument("--store-segment-size", help="memory this instance adds to the store")
    worker.add_argument("--max-num-seqs", type=int,
                        help=f"requests in a batch (default {e['max_num_seqs']})")
    worker.add_argument("--max-num-batched-tokens", type=int,
                        help=f"token budget of one step (default {e['max_num_batched_tokens']})")
    worker.add_argument("--reserve-timeout", type=float, help="seconds before an uncommitted "
                        f"decode reservation is freed (default {w['reserve_timeout_s']})")
    worker.add_argument("--no-profile", action="store_true", help="skip the start-up timing")
    worker.add_argument("--cpus", help="CPUs to run on, e.g. 1 or 0-3 (default: any)")
    worker.add_argument("--nice", type=int, help="lower this instance's priority by N "
                        f"(0..19; default {w['nice']})")
    add_engine_flags(worker)
    add_cluster_token_flag(worker)
    worker.set_defaults(run=_cmd_worker)


def _policy_config(args: argparse.Namespace) -> dict[str, object]:
    return {"policy": args.policy, "admission": args.admission, "slo_ttft_s": args.slo_ttft,
            "slo_tbt_s": args.slo_tbt, "balancing_threshold": args.balancing_threshold}


def _cmd_conductor(args: argparse.Namespace) -> int:
    from kvcake.conductor.run import run_conductor
    from kvcake.conductor.types import ConductorConfig

    config = load_config(ConductorServerConfig, "conductor", {
        "host": args.host, "port": args.port, "rpc_port": args.rpc_port,
        "rpc_host": args.rpc_host, "model": args.model,
        "served_model_name": args.served_model_name, "api_key": args.api_key,
        "instance_ttl_s": args.instance_ttl, "on_decode_failure": args.on_decode_failure,
        "store_master": args.store_master, "max_body_bytes": size_or_none(args.max_body_size),
        "keep_alive_s": args.keep_alive})
    # instances exchange prefixes through the store, never cache to cache
    policy = ConductorConfig(pull_from_instances=False, **{  # type: ignore[arg-type]
        k: v for k, v in _policy_config(args).items() if v is not None})
    run_conductor(config, policy)
    return 0


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    p = field_defaults(ConductorConfig)
    parser.add_argument("--policy", help="random, round_robin, least_loaded, cache_aware, "
                        "kvcache_centric (default)")
    parser.add_argument("--admission", help="none (default), ttft, early, predictive")
    parser.add_argument("--slo-ttft", type=float,
                        help=f"TTFT objective, seconds (default {p['slo_ttft_s']})")
    parser.add_argument("--slo-tbt", type=float,
                        help=f"TBT objective, seconds (default {p['slo_tbt_s']})")


def _add_conductor(commands: Subparsers) -> None:
    conductor = commands.add_parser("conductor", help="the global scheduler and OpenAI API")
    c, policy = field_defaults(ConductorServerConfig), field_defaults(ConductorConfig)
    conductor.add_argument("--host", help="address of the API, and of the RPC unless "
                           f"--rpc-host is given (default {c['host']})")
    conductor.add_argument("--rpc-host", help="address instances register at (default: "
                           "--host)")
    conductor.add_argument("--port", type=int, help=f"OpenAI API port (default {c['port']})")
    conductor.add_argument("--rpc-port", type=int,
                           help=f"instance RPC port (default {c['rpc_port']})")
    conductor.add_argument("--model", help=f"model whose tokenizer to use (default {c['model']})")
    conductor.add_argument("--served-model-name", help="the name clients send as model")
    conductor.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1")
    conductor.add_argument("--store-master", help="KV store master HOST:PORT: route on what "
                           "the store holds too")
    conductor.add_argument("--instance-ttl", type=float, help="seconds of silence before an "
                           f"instance is dropped (default {c['instance_ttl_s']})")
    conductor.add_argument("--max-body-size", help="longest HTTP request body, e.g. 4MiB "
                           f"(default {c['max_body_bytes']}; longer: 413)")
    conductor.add_argument("--keep-alive", type=int, metavar="SECONDS",
                           help="how long an idle HTTP connection stays open (default "
                           f"{c['keep_alive_s']}: longer than clients' idle pools, so clients "
                           "close first)")
    conductor.add_argument("--on-decode-failure", choices=DECODE_FAILURE_CHOICES,
                           help="when a decode instance dies: fail its requests (default) "
                           "or continue them elsewhere")
    conductor.add_argument("--balancing-threshold", type=float,
                           help="kvcache_centric pulls a remote prefix when best/local "
                           f"exceeds this (default {policy['balancing_threshold']})")
    _add_policy_flags(conductor)
    add_cluster_token_flag(conductor)
    conductor.set_defaults(run=_cmd_conductor)


def _cmd_up(args: argparse.Namespace) -> int:
    from kvcake.cluster.up import load_spec, run_up

    spec = load_spec(args.config, {
        "host": args.host, "internal_host": args.internal_host,
        "no_token": True if args.no_token else None, "port": args.port,
        "prefill": args.prefill, "decode": args.decode,
        "both": args.both, "policy": args.policy, "admission": args.admission,
        "slo_ttft_s": args.slo_ttft, "slo_tbt_s": args.slo_tbt, "model": args.model,
        "kv_cache_size": args.kv_cache_size,
        "store_size": "0" if args.no_store else args.store_size,
        "threads": args.threads, "api_key": args.api_key,
        "max_body_size": args.max_body_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "on_decode_failure": args.on_decode_failure, "log_dir": args.log_dir,
        "pin": False if args.no_pin else None, "ha": True if args.ha else None})
    return run_up(spec)


def _add_up(commands: Subparsers) -> None:
    up = commands.add_parser("up", help="a whole cluster on this machine, with the OpenAI API")
    s = field_defaults(ClusterSpec)
    up.add_argument("--config", help="TOML file with a [cluster] table (flags override it)")
    up.add_argument("--host", help=f"address of the OpenAI API only (default {s['host']})")
    up.add_argument("--internal-host", help="address of every internal RPC port: master, node, "
                    f"conductor RPC, workers, transfer servers (default {s['internal_host']})")
    up.add_argument("--no-token", action="store_true", help="run without a cluster token "
                    "(default: a random one, handed to the children in a 0600 file; refused "
                    "with a non-loopback --internal-host)")
    up.add_argument("--port", type=int, help=f"API port (default {s['port']})")
    up.add_argument("--prefill", type=int, help=f"prefill instances (default {s['prefill']})")
    up.add_argument("--decode", type=int, help=f"decode instances (default {s['decode']})")
    up.add_argument("--both", type=int, help=f"colocated instances (default {s['both']})")
    up.add_argument("--model", help=f"{s['model']} (default), a .gguf file or an HF directory")
    up.add_argument("--kv-cache-size", help=f"KV pool per instance (default {s['kv_cache_size']})")
    up.add_argument("--store-size",
                    help=f"memory of the KV store's node (default {s['store_size']})")
    up.add_argument("--no-store", action="store_true", help="run without the KV store")
    up.add_argument("--threads", type=int,
                    help=f"torch threads per instance (default {s['threads']})")
    up.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step per "
                    f"instance (default {s['max_num_batched_tokens']})")
    up.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1")
    up.add_argument("--max-body-size", help="longest HTTP request body, e.g. 4MiB (default "
                    f"{field_defaults(ConductorServerConfig)['max_body_bytes']}; longer: 413)")
    up.add_argument("--on-decode-failure", choices=DECODE_FAILURE_CHOICES)
    up.add_argument("--log-dir", help="write each process's log here")
    up.add_argument("--ha", action="store_true", help="start etcd and two store masters that "
                    "elect a leader (kill one: the other takes over with the same objects)")
    up.add_argument("--no-pin", action="store_true", help="let instances run on any CPU at "
                    "one priority (default: decode instances get CPUs of their own, prefill "
                    "instances run anywhere at a lower priority)")
    _add_policy_flags(up)
    add_cluster_token_flag(up)
    up.set_defaults(run=_cmd_up)


def add_serving_commands(commands: Subparsers) -> None:
    _add_worker(commands)
    _add_conductor(commands)
    _add_up(commands)
