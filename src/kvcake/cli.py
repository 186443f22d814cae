"""The ``kvcake`` command: a thin map from flags onto config objects and entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import cast

from kvcake import __version__
from kvcake.bench.serve import add_serve_bench_parser
from kvcake.chaos.commands import add_chaos_command
from kvcake.cli_errors import OneLineParser, describe_failure
from kvcake.cli_flags import (
    ENGINE_FLAGS,
    Flag,
    add_cluster_token_flag,
    add_config_flags,
    add_server_flags,
    add_tenant_flags,
    config_values,
    from_flags,
    log_level,
    positive_ints,
    tenant_overrides,
)
from kvcake.cluster.commands import add_serving_commands
from kvcake.common.config import parse_size
from kvcake.common.errors import KvcakeError
from kvcake.common.log import setup_logging
from kvcake.engine.config import EngineConfig
from kvcake.sim.commands import add_sim_commands
from kvcake.store.config import StoreConfig
from kvcake.store.master.config import MasterConfig
from kvcake.transfer.config import TRANSPORT_CHOICES, TransferConfig

_TRANSFER_FLAGS = ("host", "port", Flag("transport", choices=TRANSPORT_CHOICES), "metadata",
                   Flag("connections_per_peer", "--connections"))


def _cmd_transfer_serve(args: argparse.Namespace) -> int:
    from kvcake.transfer.peer import serve_segment

    config = from_flags(args, TransferConfig, "transfer")
    serve_segment(config, args.name, parse_size(args.size), args.fill)
    return 0


def _cmd_master(args: argparse.Namespace) -> int:
    from kvcake.store.master.run import run_master

    config = from_flags(args, MasterConfig, "master", **tenant_overrides(args))
    run_master(config, args.ready_file)  # an unknown policy fails before binding
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from kvcake.store.node import run_node

    config = from_flags(args, StoreConfig, "store")
    if not config.segment_size:
        raise KvcakeError("a node needs --segment-size > 0 (e.g. 8GiB)")
    transfer = from_flags(args, TransferConfig, "transfer")
    run_node(config, transfer, args.ready_file)
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


def _cmd_bench_vllm(args: argparse.Namespace) -> int:
    from kvcake.bench.vllm_bench import run_vllm_bench

    return run_vllm_bench(args.quick, args.json, args.vllm_python, args.lengths)


def _cmd_bench_reuse(args: argparse.Namespace) -> int:
    from kvcake.bench.reuse import run_reuse_bench

    return run_reuse_bench(quick=args.quick, as_json=args.json, lengths=args.lengths)


def _cmd_bench_handoff(args: argparse.Namespace) -> int:
    from kvcake.bench.handoff import run_handoff_bench

    return run_handoff_bench(quick=args.quick, as_json=args.json, lengths=args.lengths)


def _add_store_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    master = commands.add_parser("master", help="run the store master")
    add_config_flags(master, MasterConfig, (
        "host", "port", "metrics_port", "lease_ttl_s", "client_ttl_s", "put_timeout_s",
        "high_watermark", "evict_ratio", "eviction", "placement",
        Flag("summary_s", "--summary-interval"), "etcd", "leader_ttl_s", "put_fence_s",
        "poll_us", "location_slots", "arena_bytes"))
    add_server_flags(master)
    add_tenant_flags(master)
    master.set_defaults(run=_cmd_master)

    node = commands.add_parser("node", help="contribute memory (and disk) to the store")
    add_config_flags(node, StoreConfig, ("master", "segment_size", Flag("segment_name", "--name"),
                                         "disk_dir", "disk_capacity", "tenant", "control_port"))
    add_config_flags(node, TransferConfig, _TRANSFER_FLAGS)
    add_server_flags(node)
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
    return run_generate(options, config_values(args, EngineConfig), sys.stdout, sys.stderr)


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
    add_config_flags(gen, EngineConfig, ENGINE_FLAGS)
    gen.set_defaults(run=_cmd_generate)


def _bench(commands: argparse._SubParsersAction, name: str,  # type: ignore[type-arg]
           help_text: str, run: Callable[[argparse.Namespace], int],
           quick: str = "under a minute", lengths: str = "") -> argparse.ArgumentParser:
    """A benchmark's parser with the flags every one has (``lengths``: the default prompt
    lengths of one that takes ``--lengths``)."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    if lengths:
        parser.add_argument("--lengths", type=positive_ints,
                            help=f"prompt lengths (default {lengths})")
    parser.set_defaults(run=run)
    return parser


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = commands.add_parser("bench", help="side-by-side benchmarks")
    bench_cmds = bench.add_subparsers(dest="bench_command", required=True)
    transfer = _bench(bench_cmds, "transfer", "transfer engine vs baselines",
                      _cmd_bench_transfer)
    transfer.add_argument("--transports", default="shm,tcp", help="default shm,tcp")
    transfer.add_argument("--against", choices=("mooncake",),
                          help="also run Mooncake's transfer engine (TCP)")
    store = _bench(bench_cmds, "store", "store vs memcpy, Redis, Mooncake", _cmd_bench_store)
    store.add_argument("--against", default="", help="redis,mooncake,kvcake-ha (comma list; "
                       "kvcake-ha: kvcake's master on etcd)")
    store.add_argument("--paths", default="shm,tcp", help="default shm,tcp")
    engine = _bench(bench_cmds, "engine", "engine vs HF eager (and vLLM-CPU)", _cmd_bench_engine)
    engine.add_argument("--against", choices=("vllm",), help="also run vLLM-CPU (needs "
                        "--vllm-python)")
    engine.add_argument("--vllm-python", help="python of a vLLM-CPU venv "
                        "(default $KVCAKE_VLLM_PYTHON)")
    engine.add_argument("--batches", help="batch sizes (default 1,8,32)")
    engine.add_argument("--dtype", choices=("bfloat16", "float32", "float16"))
    engine.add_argument("--device", help="cpu (default), cuda, cuda:N (HF runs there too)")
    _bench(bench_cmds, "reuse", "TTFT: prefix KV cold vs in the store vs in the local cache",
           _cmd_bench_reuse, lengths="1024,4096,8000")
    _bench(bench_cmds, "handoff", "prefill -> decode KV handoff: after each step vs layer by "
           "layer", _cmd_bench_handoff, lengths="1024,4096")
    vllm = _bench(bench_cmds, "vllm", "vLLM-CPU TTFT: cold, local prefix cache, kvcake's "
                  "store, Mooncake, vLLM's disk connector; and a conversation's next turn",
                  _cmd_bench_vllm, quick="2048-token prompts only", lengths="1024,2048,4096")
    vllm.add_argument("--vllm-python", help="python of the vLLM venv (default "
                      "$KVCAKE_VLLM_PYTHON, else .venv-vllm/bin/python: make vllm)")
    add_serve_bench_parser(bench_cmds)


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
    add_config_flags(serve, TransferConfig, _TRANSFER_FLAGS)
    add_cluster_token_flag(serve)
    serve.set_defaults(run=_cmd_transfer_serve)

    _add_store_commands(commands)
    _add_generate_command(commands)
    add_serving_commands(commands)
    add_sim_commands(commands)
    add_chaos_command(commands)

    _add_bench_commands(commands)
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
