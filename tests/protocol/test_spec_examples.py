"""SPEC.md section 12's worked examples are checked against the reference implementation.

The examples are parsed out of SPEC.md itself (fenced blocks tagged `hex`, format described in section 12),
replayed as one conversation between two `Connection`s: each frame's octets must equal what the sending
endpoint's public API produces, and feeding them to the receiving endpoint must give exactly the events the
SPEC states. Editing either the SPEC or the code without the other fails here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import protocol
from protocol import Connection, Event, RequestHead, ResponseHead, Role
from protocol import _frames as F

from ._wire import connected_pair

SPEC = Path(__file__).resolve().parents[2] / "SPEC.md"

_BLOCK = re.compile(r"^```hex\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_META = re.compile(r"^([a-z-]+):\s*(.*)$")
_HEX_LINE = re.compile(r"^(?:[0-9a-f]{2}(?:\s+|$))+$")
# Event reprs are evaluated with the package's public names only, and no builtins.
_NAMESPACE: dict[str, object] = {"__builtins__": {}} | {
    name: getattr(protocol, name) for name in protocol.__all__
}


@dataclasses.dataclass
class Example:
    name: str
    sender: str
    octets: bytes
    events: list[Event]
    error: protocol.ErrorCode | None = None  # the octets are a connection error with this code


def parse_examples(text: str) -> list[Example]:
    examples = []
    for match in _BLOCK.finditer(text):
        meta: dict[str, list[str]] = {}
        octets = bytearray()
        for raw_line in match.group(1).splitlines():
            line = raw_line.strip()
            if not line:
                continue
            meta_match = _META.match(line)
            if meta_match:
                meta.setdefault(meta_match.group(1), []).append(meta_match.group(2))
                continue
            hex_part = line.split("#", 1)[0].strip()
            assert _HEX_LINE.match(hex_part), f"not a hex line: {raw_line!r}"
            octets += bytes.fromhex(hex_part)
        assert set(meta) <= {"example", "from", "event", "error"}, meta
        (name,) = meta["example"]
        (sender,) = meta["from"]
        events = [eval(expr, _NAMESPACE) for expr in meta.get("event", [])]
        error = protocol.ErrorCode[meta["error"][0]] if "error" in meta else None
        examples.append(Example(name, sender, bytes(octets), events, error))
    return examples


EXAMPLES = parse_examples(SPEC.read_text(encoding="utf-8"))


# -- the conversation, as the reference implementation produces it ----------------------------------


class World:
    """The relay and the agent of SPEC section 12, both with default settings."""

    def __init__(self) -> None:
        self.relay = Connection(Role.ACCEPTOR)
        self.agent = Connection(Role.DIALER)
        # The connection pair of the examples played on new connections (12.10 on).
        self.other = (self.relay, self.agent)


# Each step makes its sender produce the example's frame through the public API and returns
# (sender name, octets produced, the connection that receives them).
Step = Callable[[World], tuple[str, bytes, Connection]]
PING_DATA = bytes(range(1, 9))


def _hello(world: World) -> tuple[str, bytes, Connection]:
    # The relay's identical HELLO goes the other way (not an example of its own).
    world.agent.receive_data(world.relay.data_to_send())
    return "agent", world.agent.data_to_send(), world.relay


def _hello_no_settings(world: World) -> tuple[str, bytes, Connection]:
    # The reference implementation never sends this minimal HELLO itself: encode it with the codec and give
    # it to a fresh relay.
    return "agent", F.encode_hello([]), Connection(Role.ACCEPTOR)


def _open(world: World) -> tuple[str, bytes, Connection]:
    head = RequestHead(b"GET", b"/hello", ((b"Host", b"example.com"),))
    assert world.relay.open_stream(head, end_stream=True) == 2
    return "relay", world.relay.data_to_send(), world.agent


def _reply(world: World) -> tuple[str, bytes, Connection]:
    world.agent.send_reply(2, ResponseHead(200, b"OK", ((b"Content-Length", b"5"),)))
    return "agent", world.agent.data_to_send(), world.relay


def _data(world: World) -> tuple[str, bytes, Connection]:
    world.agent.send_data(2, b"hello", end_stream=True)
    return "agent", world.agent.data_to_send(), world.relay


def _window_update(world: World) -> tuple[str, bytes, Connection]:
    relay, agent = world.relay, world.agent
    relay.acknowledge_received_data(2, 5)  # the relay's HTTP client read "hello"
    assert relay.data_to_send() == b""  # far below half a window: nothing to credit yet
    assert relay.open_stream(RequestHead(b"GET", b"/big"), end_stream=True) == 4
    agent.receive_data(relay.data_to_send())
    agent.send_reply(4, ResponseHead(200, b"OK"))
    agent.send_data(4, bytes(131072))
    received = 0
    for event in relay.receive_data(agent.data_to_send()):
        if isinstance(event, protocol.DataReceived):
            received += len(event.data)
    assert received == 131072
    relay.acknowledge_received_data(4, received)
    return "relay", relay.data_to_send(), agent


def _reset(world: World) -> tuple[str, bytes, Connection]:
    world.relay.reset_stream(4, protocol.ErrorCode.CANCEL)
    return "relay", world.relay.data_to_send(), world.agent


def _ping(world: World) -> tuple[str, bytes, Connection]:
    world.relay.ping(PING_DATA)
    return "relay", world.relay.data_to_send(), world.agent


def _ping_ack(world: World) -> tuple[str, bytes, Connection]:
    return "agent", world.agent.data_to_send(), world.relay  # queued by the PING


def _goaway(world: World) -> tuple[str, bytes, Connection]:
    world.relay.goaway()
    return "relay", world.relay.data_to_send(), world.agent


def _hello_reserved(world: World) -> tuple[str, bytes, Connection]:
    # A reference endpoint always sends 0: set the field by hand.
    hello = bytearray(F.encode_hello([]))
    hello[11:13] = b"\xab\xcd"
    return "relay", bytes(hello), Connection(Role.DIALER)


def _goaway_short(world: World) -> tuple[str, bytes, Connection]:
    relay, _ = connected_pair()
    return "agent", F.encode_frame(protocol.FrameType.GOAWAY, 0, 0, bytes(4)), relay


def _interim_end_stream(world: World) -> tuple[str, bytes, Connection]:
    relay, agent = world.other = connected_pair()
    assert relay.open_stream(RequestHead(b"GET", b"/hello"), end_stream=True) == 2
    agent.receive_data(relay.data_to_send())
    reply = F.encode_response_head(ResponseHead(100, b""))  # send_reply refuses END_STREAM on an interim head
    return "agent", F.encode_frame(protocol.FrameType.REPLY, 1, 2, reply), relay


def _interim_end_stream_reset(world: World) -> tuple[str, bytes, Connection]:
    relay, agent = world.other
    return "relay", relay.data_to_send(), agent


STEPS: dict[str, Step] = {
    "hello": _hello,
    "hello-no-settings": _hello_no_settings,
    "open": _open,
    "reply": _reply,
    "data": _data,
    "window-update": _window_update,
    "reset": _reset,
    "ping": _ping,
    "ping-ack": _ping_ack,
    "goaway": _goaway,
    "hello-reserved": _hello_reserved,
    "goaway-short": _goaway_short,
    "interim-end-stream": _interim_end_stream,
    "interim-end-stream-reset": _interim_end_stream_reset,
}


def test_spec_has_every_example_in_order() -> None:
    assert len(EXAMPLES) >= 8
    assert [example.name for example in EXAMPLES] == list(STEPS)


def test_examples_are_single_well_formed_frames() -> None:
    for example in EXAMPLES:
        length, frame_type, _, _ = F.unpack_header(example.octets, 0)
        assert length == len(example.octets) - F.FRAME_HEADER_SIZE, example.name
        assert frame_type in set(protocol.FrameType), example.name


def _replay(split: bool) -> None:
    world = World()
    for example in EXAMPLES:
        sender, produced, receiver = STEPS[example.name](world)
        assert sender == example.sender, example.name
        assert produced.hex(" ") == example.octets.hex(" "), example.name
        if example.error is not None:
            with pytest.raises(protocol.RemoteProtocolError) as raised:
                receiver.receive_data(example.octets)
            assert raised.value.error_code is example.error, example.name
            goaway = receiver.data_to_send()  # the answer: a GOAWAY with the code, alone
            assert goaway[3] == protocol.FrameType.GOAWAY and goaway[13:17] == example.error.to_bytes(
                4, "big"
            )
            continue
        if split:
            # Receivers accept any grouping: one octet at a time gives the same events.
            events: list[Event] = []
            for i in range(len(example.octets)):
                events += receiver.receive_data(example.octets[i : i + 1])
        else:
            events = receiver.receive_data(example.octets)
        # Event equality compares DataReceived's memoryview with the SPEC's bytes by content.
        assert events == example.events, example.name
        assert receiver.state is protocol.ConnectionState.OPEN
    assert world.agent.data_to_send() == world.relay.data_to_send() == b""


def test_conversation() -> None:
    _replay(split=False)


def test_conversation_one_octet_at_a_time() -> None:
    _replay(split=True)


def test_parser_rejects_garbage_lines() -> None:
    with pytest.raises(AssertionError):
        parse_examples("```hex\nexample: x\nfrom: agent\nzz 00\n```\n")
