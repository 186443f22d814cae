"""The ``kvcake`` command: a thin map from flags onto config objects and entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvcake import __version__
from kvcake.common.config import TransferConfig, load_config, parse_size
from kvcake.common.errors import KvcakeError
from kvcake.common.log import setup_logging


def _transfer_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "host": args.host,
        "port": args.port,
        "transport": args.transport,
        "metadata": args.metadata,
        "connections_per_peer": args.connections,
    }


def _add_transfer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind and advertise (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: ephemeral)")
    parser.add_argument("--transport", choices=("auto", "shm", "tcp"))
    parser.add_argument("--metadata", help="p2p, local or etcd://HOST:PORT")
    parser.add_argument("--connections", type=int, help="TCP connections per peer")


def _cmd_transfer_serve(args: argparse.Namespace) -> int:
    from kvcake.transfer.peer import serve_segment

    config = load_config(TransferConfig, "transfer", _transfer_overrides(args))
    serve_segment(config, args.name, parse_size(args.size), args.fill)
    return 0


def _cmd_bench_transfer(args: argparse.Namespace) -> int:
    from kvcake.bench.transfer import run_transfer_bench

    return run_transfer_bench(
        quick=args.quick,
        as_json=args.json,
        transports=args.transports.split(","),
        against=args.against,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcake", description=__doc__)
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default), ERROR")
    parser.add_argument("--version", action="version", version=f"kvcake {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    transfer = commands.add_parser("transfer", help="transfer engine tools")
    transfer_cmds = transfer.add_subparsers(dest="transfer_command", required=True)
    serve = transfer_cmds.add_parser("serve", help="own one segment and serve it to peers")
    serve.add_argument("--name", default="kv0", help="segment name (default kv0)")
    serve.add_argument("--size", default="64MiB", help="segment size (default 64MiB)")
    serve.add_argument("--fill", type=int, help="fill the segment with test pattern SEED")
    _add_transfer_flags(serve)
    serve.set_defaults(run=_cmd_transfer_serve)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        code: int = args.run(args)
    except KvcakeError as exc:
        print(f"kvcake: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
