"""What every package's frozen config is built with, and the one place that reads ``KVCAKE_*``.

Each package owns its ``@dataclass(frozen=True)`` config in its ``config.py`` (transfer, store,
store/master, engine, worker, conductor): fields document units and ranges, ``__post_init__``
checks them with :func:`require`. :func:`load_config` layers, lowest first: field defaults,
a config file's ``[section]`` table (``--config``; ``kvcake up`` writes one per child),
``KVCAKE_<SECTION>_<FIELD>`` environment variables, explicit overrides (CLI flags).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from kvcake.common.errors import InvalidParamsError

C = TypeVar("C")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """``"64KiB"``, ``"16M"``, ``"1g"`` or ``"4096"`` to a byte count (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidParamsError(f"not a size: {text!r} (try 4096, 64KiB, 16MiB, 1GiB)")
    return int(match.group(1)) * _UNITS[match.group(2)[:1].lower()]


def format_size(size: int) -> str:
    """Bytes in the largest binary unit that keeps one decimal meaningful: ``1.5 GiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def require(ok: bool, message: str) -> None:
    """Raise :class:`InvalidParamsError` with ``message`` unless ``ok`` (configs' checks)."""
    if not ok:
        raise InvalidParamsError(message)


def parse_cpus(text: str) -> set[int]:
    """``"0-2,5"`` to ``{0, 1, 2, 5}``; empty text is the empty set (no restriction)."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        require(low.isdigit() and (not high or high.isdigit()),
                f"cpus must look like 0-3,5; got {text!r}")
        first, last = int(low), int(high or low)
        require(first <= last, f"cpus range {part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return cpus


def check_at_least(config: Any, low: float, *names: str, above: bool = False) -> None:
    """Each named field of ``config`` is >= ``low`` (> ``low`` with ``above``)."""
    sign = ">" if above else ">="
    for name in names:
        value = getattr(config, name)
        require(value > low if above else value >= low,
                f"{name} must be {sign} {low:g}, got {value}")


def check_within(config: Any, low: float, high: float, *names: str) -> None:
    """Each named field of ``config`` is in ``low..high``."""
    for name in names:
        value = getattr(config, name)
        require(low <= value <= high, f"{name} must be {low:g}..{high:g}, got {value}")


def _convert(raw: str, kind: Any, name: str) -> Any:
    if kind in (bool, "bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidParamsError(f"{name}: expected true/false, got {raw!r}")
    if kind in (int, "int"):
        sized = name.endswith(("BYTES", "SIZE", "CAPACITY"))
        return parse_size(raw) if sized else _as_number(int, raw, name)
    if kind in (float, "float"):
        return _as_number(float, raw, name)
    return raw


def _as_number(kind: type[Any], raw: str, name: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise InvalidParamsError(f"{name}: expected a {kind.__name__}, got {raw!r}") from None


def load_config(
    cls: type[C],
    section: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    file: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from, lowest first: defaults, the ``[section]`` table of a config
    ``file`` (:func:`read_config_file`), ``KVCAKE_<SECTION>_<FIELD>``, then ``overrides``.

    ``None`` values in ``overrides`` mean "not given" and are skipped.
    """
    env = os.environ if environ is None else environ
    values = table_values(cls, section, (file or {}).get(section, {}))
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"KVCAKE_{section.upper()}_{field.name.upper()}"
        if name in env:
            values[field.name] = _convert(env[name], field.type, name)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return cls(**values)


def read_config_file(path: str, what: str = "config file") -> dict[str, Any]:
    """A TOML file of one table per section (``[master]``, ``[engine]``, …)."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidParamsError(f"cannot read {what} {path}: {exc}") from None


def write_config_file(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """The TOML :func:`read_config_file` reads: a table per section, of text, whole numbers,
    numbers and booleans (the file is this user's alone: it may hold an API key)."""
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    assert isinstance(value, str), f"not a config value: {value!r}"
    return json.dumps(value)  # a JSON string is a TOML basic string


def table_values(cls: type[Any], section: str, table: Any) -> dict[str, Any]:
    """The fields a ``[section]`` table sets, each checked against its field's type (a size
    field also takes text such as ``"4MiB"``); unknown keys are refused by name."""
    require(isinstance(table, dict), f"[{section}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    require(not unknown, f"unknown [{section}] keys {unknown}; known: {sorted(known)}")
    return {key: _table_value(section, key, known[key].type, value)
            for key, value in table.items()}


def _table_value(section: str, key: str, kind: Any, value: Any) -> Any:
    if kind == "int" and isinstance(value, str) and key.endswith(("_bytes", "_size",
                                                                   "_capacity")):
        return parse_size(value)
    want = _TABLE_TYPES.get(str(kind))
    if want is None:  # a type its config's __post_init__ checks
        return value
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    require(ok or (want is float and type(value) is int),
            f"[{section}] {key} must be {_TYPE_WORDS[want]}, got {value!r}")
    return value


_TABLE_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string",
               bool: "true or false"}


def env_value(name: str, default: str = "") -> str:
    """A single ``KVCAKE_<name>`` variable (for settings that belong to no config class)."""
    return os.environ.get(f"KVCAKE_{name}", default)


CLUSTER_TOKEN_ENV = "KVCAKE_CLUSTER_TOKEN"
MIN_CLUSTER_TOKEN_CHARS = 16


def read_cluster_token(token_file: str | None = None,
                       environ: Mapping[str, str] | None = None) -> str:
    """The shared cluster token: the file's content (``--cluster-token-file``) when given,
    else ``KVCAKE_CLUSTER_TOKEN``, else ``""`` (no authentication). Surrounding whitespace
    is dropped; a token shorter than 16 characters is refused. The error never quotes it."""
    env = os.environ if environ is None else environ
    token = _token_from_file(token_file) if token_file else env.get(CLUSTER_TOKEN_ENV, "")
    token = token.strip()
    source = token_file or CLUSTER_TOKEN_ENV
    require(not (token_file and not token), f"cluster token file {token_file} is empty")
    require(not token or len(token) >= MIN_CLUSTER_TOKEN_CHARS,
            f"the cluster token from {source} has {len(token)} characters; use at least "
            f"{MIN_CLUSTER_TOKEN_CHARS} (e.g. python -c 'import secrets; "
            f"print(secrets.token_hex(32))')")
    return token


def _token_from_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParamsError(f"cannot read cluster token file {path}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None


def is_endpoint(text: str) -> bool:
    """Whether ``text`` looks like ``HOST:PORT``."""
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit()


def read_json_object(path: Path) -> dict[str, Any]:
    """A model file that must hold one JSON object; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidParamsError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise InvalidParamsError(f"{path} does not hold a JSON object")
    return data
