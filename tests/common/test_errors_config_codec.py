import asyncio
import socket
from pathlib import Path

import msgspec
import pytest

from kvcake.common import codec
from kvcake.common.config import load_config, parse_size, read_config_file, write_config_file
from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    ProtocolError,
    SegmentNotFoundError,
    TransferError,
    error_from_code,
    unreachable,
)
from kvcake.common.rpc import RpcClient, RpcServer
from kvcake.engine.config import EngineConfig
from kvcake.store.config import StoreConfig
from kvcake.transfer.config import TransferConfig


def test_error_codes_keep_mooncake_names_and_values() -> None:
    assert ErrorCode.OBJECT_NOT_FOUND == -704
    assert ErrorCode.NO_AVAILABLE_HANDLE == -200
    assert ErrorCode.OBJECT_HAS_LEASE == -706
    assert ErrorCode.SEGMENT_NOT_FOUND == -101
    assert ErrorCode.TRANSFER_FAIL == -800


def test_errors_carry_code_and_status_hint() -> None:
    error = SegmentNotFoundError("no segment 'x'")
    assert isinstance(error, KvcakeError)
    assert error.code is ErrorCode.SEGMENT_NOT_FOUND
    assert error.status == 404
    assert str(error) == "SEGMENT_NOT_FOUND: no segment 'x'"
    assert TransferError("down").status == 502


def test_error_from_code_rebuilds_the_specific_class() -> None:
    assert isinstance(error_from_code(-101, "gone"), SegmentNotFoundError)
    rebuilt = error_from_code(-10, "too far")
    assert isinstance(rebuilt, InvalidParamsError)
    assert rebuilt.code is ErrorCode.BUFFER_OVERFLOW
    assert "unknown remote error code 12345" in str(error_from_code(12345, "?"))


def test_a_call_nobody_answers_is_unreachable_and_a_refusal_is_not() -> None:
    """What an instance logs when its Conductor fails it: unreachable (nobody listens, or
    no reply in time), or refused (the Conductor answered with an error)."""

    def refuse(_: memoryview) -> bytes:
        raise InvalidParamsError("instance x serves another model")

    async def failures() -> tuple[KvcakeError, KvcakeError]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))  # bound, never listening: refused connections
            nobody = RpcClient(f"127.0.0.1:{probe.getsockname()[1]}", 2.0)
            with pytest.raises(KvcakeError) as silent:
                await nobody.call(b"hello")
            nobody.close()
        server = RpcServer(refuse, "127.0.0.1", 0)
        client = RpcClient(await server.startup(), 2.0)
        try:
            with pytest.raises(KvcakeError) as answered:
                await client.call(b"hello")
        finally:
            client.close()
            await server.shutdown()
        return silent.value, answered.value

    silent, answered = asyncio.run(failures())
    assert unreachable(silent)
    assert not unreachable(answered) and answered.code is ErrorCode.INVALID_PARAMS


@pytest.mark.parametrize(
    ("text", "size"), [("4096", 4096), ("64KiB", 65536), ("16M", 16 << 20), ("1 g", 1 << 30)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_names_the_bad_input() -> None:
    with pytest.raises(InvalidParamsError, match="'lots'"):
        parse_size("lots")


def test_config_layers_defaults_env_then_overrides() -> None:
    env = {"KVCAKE_TRANSFER_TIMEOUT_S": "2.5", "KVCAKE_TRANSFER_CONNECTIONS_PER_PEER": "4",
           "KVCAKE_TRANSFER_MAX_FRAME_BYTES": "1MiB", "KVCAKE_TRANSFER_PRETOUCH": "off"}
    config = load_config(TransferConfig, "transfer", {"connections_per_peer": 3, "port": None},
                         environ=env)
    assert config.timeout_s == 2.5
    assert config.connections_per_peer == 3
    assert config.max_frame_bytes == 1 << 20
    assert config.pretouch is False
    assert config.port == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"transport": "carrier-pigeon"}, "transport"), ({"port": 70000}, "port"),
     ({"connections_per_peer": 0}, "connections_per_peer"), ({"timeout_s": 0}, "timeout_s"),
     ({"metadata": "zookeeper"}, "metadata")],
)
def test_config_rejects_out_of_range_fields(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidParamsError, match=message):
        TransferConfig(**fields)  # type: ignore[arg-type]


def test_a_config_file_sits_between_defaults_and_env(tmp_path: Path) -> None:
    path = tmp_path / "kvcake.toml"
    write_config_file(path, {"transfer": {"timeout_s": 2, "host": "127.0.0.1",
                                          "max_frame_bytes": 1 << 20, "pretouch": False},
                             "store": {"master": "x:1"}})
    assert path.stat().st_mode & 0o777 == 0o600
    file = read_config_file(str(path))
    config = load_config(TransferConfig, "transfer", {"connections_per_peer": 3},
                         environ={"KVCAKE_TRANSFER_TIMEOUT_S": "4"}, file=file)
    assert (config.timeout_s, config.max_frame_bytes, config.pretouch) == (4.0, 1 << 20, False)
    assert config.connections_per_peer == 3
    assert load_config(StoreConfig, "store", environ={}, file={
        "store": {"master": "x:1", "segment_size": "4MiB"}}).segment_size == 4 << 20


@pytest.mark.parametrize(("table", "message"), [
    ({"timeout": 1}, r"unknown \[transfer\] keys \['timeout'\]"),
    ({"timeout_s": "soon"}, r"\[transfer\] timeout_s must be a number, got 'soon'"),
    ({"pretouch": 1}, r"\[transfer\] pretouch must be true or false"),
    ({"port": True}, r"\[transfer\] port must be a whole number"),
])
def test_a_bad_config_file_table_is_named(table: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidParamsError, match=message):
        load_config(TransferConfig, "transfer", environ={}, file={"transfer": table})


def test_env_value_of_the_wrong_type_is_named() -> None:
    with pytest.raises(InvalidParamsError, match="KVCAKE_TRANSFER_TIMEOUT_S"):
        load_config(TransferConfig, "transfer", environ={"KVCAKE_TRANSFER_TIMEOUT_S": "soon"})


class Ping(msgspec.Struct, tag="ping"):
    n: int


class Pong(msgspec.Struct, tag="pong"):
    n: int


def test_codec_round_trips_a_tagged_union() -> None:
    assert codec.decode(codec.encode(Pong(3)), Ping | Pong) == Pong(3)


class Named(msgspec.Struct, tag="named"):
    name: str


def test_text_utf8_cannot_carry_is_refused_by_name_before_anything_is_sent() -> None:
    with pytest.raises(InvalidParamsError, match=r"Named: text is not valid UTF-8 "
                       r"\('\\ud800' at 2 of 'ab\\ud800'\)"):
        codec.encode(Named("ab\ud800"))


def test_codec_rejects_garbage_with_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="malformed control message"):
        codec.decode(b"\xc1\x00", Ping | Pong)


def test_auto_dtype_is_bf16_only_where_it_is_computed_natively(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcake.engine import config
    assert config.resolve_dtype("float16", "cpu") == "float16"  # an explicit choice stays
    assert config.resolve_dtype("auto", "cuda:0") == "bfloat16"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(config, "cpu_has_native_bf16", lambda native=native: native)
        assert config.resolve_dtype("auto", "cpu") == expected
        assert config.EngineConfig().dtype == expected  # resolved when the config is made


@pytest.mark.parametrize("master", ["127.0.0.1:50051", "etcd://127.0.0.1:2379/chaos-0/"])
def test_a_store_master_may_be_an_address_or_an_etcd_url_with_a_prefix(master: str) -> None:
    assert StoreConfig(master=master).master == master
    assert EngineConfig(store_master=master).store_master == master
