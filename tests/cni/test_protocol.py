"""The socket protocol and its JSON fast path, which must behave exactly like `json`."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni import errors, protocol
from cni.errors import CniError
from cni.protocol import (
    AgentUnreachable,
    call,
    decode_request,
    decode_response,
    dumps,
    encode_error,
    encode_request,
    encode_result,
    loads,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


def test_the_fast_path_is_in_use() -> None:
    assert protocol._scan is not None and protocol._encode is not None


@given(json_values)
def test_dumps_and_loads_match_json(value: object) -> None:
    assert dumps(value) == json.dumps(value, separators=(",", ":"))
    assert loads(dumps(value)) == json.loads(json.dumps(value))
    assert loads(json.dumps(value, indent=2).encode()) == value


@pytest.mark.parametrize("text", ["", "{", '{"a": 1,}', "[1] x", "nul", '{"a": "\x01"}', " "])
def test_malformed_json_fails_with_jsons_message(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(ValueError) as got:
        loads(text)
    assert str(got.value) == str(expected.value)


def test_framing_round_trips() -> None:
    assert decode_request(encode_request("cni.add", {"x": 1})) == ("cni.add", {"x": 1})
    assert decode_response(encode_result({"ok": 1})) == {"ok": 1}
    with pytest.raises(CniError) as err:
        decode_response(encode_error(CniError(100, "pool exhausted", "none left")))
    assert (err.value.code, err.value.msg, err.value.details) == (
        100,
        "pool exhausted",
        "none left",
    )


@pytest.mark.parametrize(
    ("line", "code"),
    [(b"{", errors.UNDECODABLE_CONFIG), (b"[]", errors.INVALID_CONFIG),
     (b'{"op": "x", "args": []}', errors.INVALID_CONFIG)],
)  # fmt: skip
def test_bad_requests(line: bytes, code: int) -> None:
    with pytest.raises(CniError) as err:
        decode_request(line)
    assert err.value.code == code


def test_call_without_an_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentUnreachable, match="cannot connect"):
        call(str(tmp_path / "none.sock"), "x", {})


def test_call_to_an_agent_that_hangs_up(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(100)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    with pytest.raises(AgentUnreachable, match="without answering"):
        call(str(path), "x", {})
    thread.join()
    server.close()
