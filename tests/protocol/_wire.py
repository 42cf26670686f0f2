"""Test helpers shared by the protocol tests: frames written out by hand, a connected pair, and an in-memory
wire that knows which frames it carries.

`frame`, `header` and `block` write SPEC 3 and 5.3 octet by octet, independently of the encoder under test.
The stateful test needs "bytes in flight" per stream and per connection (SPEC 8 conservation). Rather than
trusting the core's own counters, the wire parses every frame `data_to_send` hands it (9-byte header,
SPEC 3) and remembers where each frame ends, so the frames not yet fully fed to the peer are known exactly.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from collections.abc import Iterable

from protocol import FRAME_HEADER_SIZE, Connection, Event, FrameType, Headers, Role, Settings

_HEADER = struct.Struct(">IBI")
_U32 = struct.Struct(">I")

# Stream payloads are slices of one 251-periodic pattern: every stream direction gets its own phase, so a byte
# delivered to the wrong stream or at the wrong offset shows up, and sending never copies.
_PERIOD = 251
_PATTERN = memoryview(bytes(range(_PERIOD)) * ((1 << 20) // _PERIOD + 2))


def header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    """A 9-octet frame header (SPEC 3)."""
    return length.to_bytes(3, "big") + bytes((frame_type, flags)) + stream_id.to_bytes(4, "big")


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return header(len(payload), frame_type, flags, stream_id) + payload


def block(headers: Headers) -> bytes:
    """A header block (SPEC 5.3)."""
    out = struct.pack(">H", len(headers))
    for name, value in headers:
        out += struct.pack(">H", len(name)) + name + struct.pack(">H", len(value)) + value
    return out


def connected_pair(
    relay_settings: Settings | None = None, agent_settings: Settings | None = None
) -> tuple[Connection, Connection]:
    """A relay and an agent that exchanged their HELLOs."""
    relay = Connection(Role.ACCEPTOR, relay_settings)
    agent = Connection(Role.DIALER, agent_settings)
    agent.receive_data(relay.data_to_send())
    relay.receive_data(agent.data_to_send())
    return relay, agent


def payload(seed: int, offset: int, size: int) -> memoryview:
    """`size` octets (at most 1 MiB) of the stream direction `seed`, starting at stream offset `offset`."""
    start = (offset + seed) % _PERIOD
    return _PATTERN[start : start + size]


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    end: int  # wire offset just past the frame
    type: int
    flags: int
    stream_id: int
    length: int
    increment: int  # WINDOW_UPDATE increment, else 0


def parse_frames(data: bytes, base: int = 0) -> list[Frame]:
    """Split bytes from `data_to_send` into frames; they must hold whole frames only (SPEC 2)."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= FRAME_HEADER_SIZE, "data_to_send returned a partial frame header"
        length_type, flags, stream_id = _HEADER.unpack_from(data, pos)
        length, frame_type = length_type >> 8, length_type & 0xFF
        end = pos + FRAME_HEADER_SIZE + length
        assert end <= len(data), "data_to_send returned a partial frame"
        increment = 0
        if frame_type == FrameType.WINDOW_UPDATE:
            increment = _U32.unpack_from(data, pos + FRAME_HEADER_SIZE)[0] & 0x7FFFFFFF
        frames.append(Frame(base + end, frame_type, flags, stream_id & 0x7FFFFFFF, length, increment))
        pos = end
    return frames


class Wire:
    """One direction: octets pulled from a Connection and not yet fed to its peer."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pulled = 0
        self.delivered = 0
        self.frames: deque[Frame] = deque()  # frames the peer has not completely received

    def push(self, data: bytes) -> list[Frame]:
        frames = parse_frames(data, self.pulled)
        self.frames.extend(frames)
        self.buffer += data
        self.pulled += len(data)
        return frames

    def take(self, size: int) -> tuple[bytes, list[Frame]]:
        """Remove up to `size` octets; also return the frames they complete (the peer processes them)."""
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.delivered += len(chunk)
        done: list[Frame] = []
        while self.frames and self.frames[0].end <= self.delivered:
            done.append(self.frames.popleft())
        return chunk, done


@dataclasses.dataclass
class InFlight:
    """DATA octets and WINDOW_UPDATE increments sent (or queued) by one endpoint and not yet processed."""

    data: dict[int, int] = dataclasses.field(default_factory=dict)
    data_total: int = 0
    window: dict[int, int] = dataclasses.field(default_factory=dict)


def in_flight(conn: Connection, wire: Wire) -> InFlight:
    """What `conn` has committed to its peer but the peer has not processed yet.

    White box: a WINDOW_UPDATE is credited in the receiver's books when it is *queued* (`_control`, a deque of
    whole encoded frames), not when `data_to_send` hands it out, so the queue must be counted as in flight.
    DATA is never in `_control` (windows are charged when DATA is framed).
    """
    result = InFlight()
    queued = [f for raw in conn._control for f in parse_frames(raw)]
    frames: Iterable[Frame] = [*wire.frames, *queued]
    for frame in frames:
        if frame.type == FrameType.DATA:
            result.data[frame.stream_id] = result.data.get(frame.stream_id, 0) + frame.length
            result.data_total += frame.length
        elif frame.type == FrameType.WINDOW_UPDATE:
            result.window[frame.stream_id] = result.window.get(frame.stream_id, 0) + frame.increment
    return result


def normalized(events: Iterable[Event]) -> list[tuple[object, ...]]:
    """Events as comparable tuples (memoryviews turned into bytes)."""
    out: list[tuple[object, ...]] = []
    for event in events:
        fields = [getattr(event, f.name) for f in dataclasses.fields(event)]  # type: ignore[arg-type]
        out.append((type(event).__name__, *(bytes(v) if isinstance(v, memoryview) else v for v in fields)))
    return out
