"""Flags shared by several ``kvcake`` commands, and their mapping onto config fields."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from kvcake.common.config import format_size, parse_size
from kvcake.engine.config import EngineConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def field_defaults(config: type[Any]) -> dict[str, str]:
    """Each field's default as help texts print it (``0.9``, ``1``, ``4MiB``), so that a
    default is written once, in its config class."""
    return {f.name: _shown(f.name, f.default) for f in dataclasses.fields(config)}


def _shown(name: str, value: Any) -> str:
    if name.endswith("_bytes"):
        return format_size(value).replace(" ", "")
    return f"{value:g}" if isinstance(value, float) else str(value)


def size_or_none(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


def log_level(text: str) -> str:
    """``--log-level``: one of :data:`LOG_LEVELS`, any case."""
    level = text.upper()
    if level not in LOG_LEVELS or not isinstance(logging.getLevelName(level), int):
        raise argparse.ArgumentTypeError(f"unknown level {text!r}; one of {', '.join(LOG_LEVELS)}")
    return level


def positive_ints(text: str) -> list[int]:
    """A comma list of whole numbers > 0, e.g. ``1024,4096``."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma list of whole numbers > 0 (e.g. 1024,4096)")
    return [int(v) for v in values]


def engine_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {"model": args.model, "dtype": args.dtype, "device": args.device,
            "attention": args.attention, "block_size": args.block_size,
            "kv_cache_bytes": size_or_none(args.kv_cache_size), "threads": args.threads}


def add_cluster_token_flag(parser: argparse.ArgumentParser) -> None:
    """``--cluster-token-file``: read by :func:`kvcake.cli.main` before the command runs."""
    parser.add_argument("--cluster-token-file", metavar="PATH",
                        help="file holding the shared cluster token every connection must "
                        "prove (default: $KVCAKE_CLUSTER_TOKEN; neither: no authentication)")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    e = field_defaults(EngineConfig)
    parser.add_argument("--model", help=f"{e['model']} (default), a .gguf file or an HF directory")
    parser.add_argument("--dtype", help="auto (default: bfloat16 where the CPU computes it "
                        "natively, else float32), bfloat16, float32, float16")
    parser.add_argument("--device", help=f"{e['device']} (default), cuda, cuda:N")
    parser.add_argument("--attention", help=f"{e['attention']} (default) or eager (HF's exact "
                        "math)")
    parser.add_argument("--block-size", type=int,
                        help=f"tokens per KV block (default {e['block_size']})")
    parser.add_argument("--kv-cache-size", help="bytes of the paged KV pool, e.g. 512MiB")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def add_tenant_flags(master: argparse.ArgumentParser) -> None:
    """The master's tenant quotas and tokens (see :mod:`kvcake.store.master.tenants`)."""
    master.add_argument("--tenant-quota", action="append", metavar="NAME=SIZE",
                        help="memory quota of one tenant, e.g. acme=512MiB (repeatable; "
                        "0 = unlimited)")
    master.add_argument("--default-tenant-quota", metavar="SIZE",
                        help="quota of every tenant not named (default 0 = unlimited)")
    master.add_argument("--tenants-file", metavar="PATH",
                        help="TOML or JSON file of tenant quotas and tokens; --tenant-quota "
                        "flags override its quotas")


def tenant_overrides(args: argparse.Namespace) -> dict[str, object]:
    from kvcake.store.master import load_tenants, merge_tenants, parse_tenant_quota

    default, policies = load_tenants(args.tenants_file) if args.tenants_file else (None, ())
    flags = [parse_tenant_quota(text) for text in args.tenant_quota or []]
    default_flag = size_or_none(args.default_tenant_quota)
    return {"default_tenant_quota_bytes": default if default_flag is None else default_flag,
            "tenants": merge_tenants(policies, flags) if policies or flags else None}
