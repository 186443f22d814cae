"""Flags shared by several ``kvcake`` commands, and their mapping onto config fields."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvcake.common.config import format_size, load_config, parse_size, read_config_file
from kvcake.engine.config import ATTENTION_CHOICES, DTYPE_CHOICES

C = TypeVar("C")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Flag:
    """One config field as a CLI flag. Unless given here, everything follows from the field:
    the name (``--lease-ttl`` for ``lease_ttl_s``, ``--kv-cache-size`` for
    ``kv_cache_bytes``), the type (a size such as ``4MiB`` for ``*_bytes``, ``*_size`` and
    ``*_capacity``), and the help: the field's entry in its config's docstring, where units
    and ranges are written once, then its default."""

    field: str
    name: str = ""
    help: str = ""
    choices: tuple[str, ...] = ()
    metavar: str | None = None


def add_config_flags(parser: argparse.ArgumentParser, config: type[Any],
                     flags: Iterable[str | Flag]) -> None:
    """A flag for each of ``flags`` (field names, or :class:`Flag` for the exceptions);
    :func:`config_values` reads them back."""
    docs, fields = field_docs(config), {f.name: f for f in dataclasses.fields(config)}
    for flag in (f if isinstance(f, Flag) else Flag(f) for f in flags):
        field = fields[flag.field]
        text = flag.help or docs.get(flag.field, "")
        default = _shown(field.name, field.default)
        if default and "default" not in text:
            text = f"{text} (default {default})" if text else f"default {default}"
        options: dict[str, Any] = {"dest": f"{config.__name__}.{field.name}", "help": text}
        if isinstance(field.default, bool):
            options.update(action="store_const", const=not field.default)
            if field.default:
                options["help"] = f"turn off (on by default): {text}"
        elif flag.choices:
            options["choices"] = flag.choices
        elif field.type in ("int", "float") and not _is_size(field.name):
            options["type"] = int if field.type == "int" else float
        if not isinstance(field.default, bool) and not flag.choices:
            options["metavar"] = flag.metavar or _metavar(field.name)
        parser.add_argument(flag.name or _flag_name(field.name, field.default), **options)


def config_values(args: argparse.Namespace, config: type[Any]) -> dict[str, Any]:
    """The fields of ``config`` whose flags were given (sizes parsed: ``4MiB`` to bytes)."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(args, f"{config.__name__}.{field.name}", None)
        if value is not None:
            sized = _is_size(field.name) and field.type == "int"  # ClusterSpec keeps text
            values[field.name] = parse_size(value) if sized else value
    return values


def field_docs(config: type[Any]) -> dict[str, str]:
    """Each field's entry in the config's docstring (``name: text``, continued on indented
    lines; ``a, b:`` and ``a / b:`` give both fields one entry), as plain text."""
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in inspect.cleandoc(config.__doc__ or "").splitlines()[1:]:
        if entry := _DOC_ENTRY.match(line):
            names = re.split(r", | / ", entry[1])
            docs.update(dict.fromkeys(names, entry[2]))
        elif line.startswith(" ") and names:
            docs.update({name: f"{docs[name]} {line.strip()}" for name in names})
        else:
            names = []
    return {name: _plain(text) for name, text in docs.items()}


def _plain(text: str) -> str:
    """The first sentence, without reST markup, safe for argparse's %-formatting."""
    first = re.split(r"(?<=\.) (?=[A-Z])", text)[0].rstrip(".")
    return _ROLE.sub(r"\1", first).replace("``", "").replace("%", "%%")


_DOC_ENTRY = re.compile(r"^([a-z_][a-z0-9_]*(?:(?:, | / )[a-z_][a-z0-9_]*)*): (.*)$")
_ROLE = re.compile(r":\w+:`~?([^`]+)`")
_SIZED = ("_bytes", "segment_size", "_capacity", "cache_size", "store_size", "disk_size",
          "body_size")


def _is_size(name: str) -> bool:
    return name.endswith(_SIZED)


def _metavar(name: str) -> str:
    if _is_size(name):
        return "SIZE"
    return "SECONDS" if name.endswith("_s") else name.upper()


def _flag_name(name: str, default: Any) -> str:
    stem = name.removesuffix("_s").replace("_bytes", "_size").replace("_", "-")
    return f"--no-{stem}" if default is True else f"--{stem}"


def field_defaults(config: type[Any]) -> dict[str, str]:
    """Each field's default as help texts print it (``0.9``, ``1``, ``4MiB``)."""
    return {f.name: _shown(f.name, f.default) for f in dataclasses.fields(config)}


def _shown(name: str, value: Any) -> str:
    if isinstance(value, bool) or value in ("", None, ()):
        return ""
    if _is_size(name) and isinstance(value, int) and value:
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


def add_cluster_token_flag(parser: argparse.ArgumentParser) -> None:
    """``--cluster-token-file``: read by :func:`kvcake.cli.main` before the command runs."""
    parser.add_argument("--cluster-token-file", metavar="PATH",
                        help="file holding the shared cluster token every connection must "
                        "prove (default: $KVCAKE_CLUSTER_TOKEN; neither: no authentication)")


def config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The tables of ``--config`` (``{}`` without one, or for a command without it)."""
    path = getattr(args, "config_file", None)
    return read_config_file(path) if path else {}


def from_flags(args: argparse.Namespace, config: type[C], section: str,
               **fixed: Any) -> C:
    """``config`` from its defaults, the ``[section]`` of ``--config``, ``KVCAKE_*``, then
    ``fixed`` and the flags given (:func:`kvcake.common.config.load_config`)."""
    return load_config(config, section, {**fixed, **config_values(args, config)},
                       file=config_file(args))


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """What every server command takes besides its config's flags: a config file
    (:func:`config_file`), a ready file, and the cluster token."""
    parser.add_argument("--config", dest="config_file", metavar="PATH",
                        help="TOML file with a table per config section (flags override it)")
    parser.add_argument("--ready-file", default="", metavar="PATH",
                        help="write {\"pid\", \"endpoints\"} JSON here once serving "
                        "(removed on exit)")
    add_cluster_token_flag(parser)


ENGINE_FLAGS = (
    Flag("model", help="smollm2 (default), a .gguf file or an HF directory"),
    Flag("dtype", choices=DTYPE_CHOICES), "device", Flag("attention", choices=ATTENTION_CHOICES),
    "block_size", "kv_cache_bytes", "threads")


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
