"""Focused properties of the core's flow control, scheduling and parsing (SPEC.md 2, 8, 9).

- head-of-line isolation: a reader that never reads holds one stream window, and its siblings still finish;
- round-robin fairness: with K streams that all have data and window, every K consecutive DATA frames carry
  one frame of each stream;
- split independence: the same octets fed in any split produce the same events.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    MAX_WINDOW,
    Connection,
    DataReceived,
    ErrorCode,
    Event,
    FrameType,
    LocalProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
)

from ._wire import connected_pair, normalized, parse_frames, payload

MIB = 1 << 20
OUTBOUND_CAP = 64 * 1024


@given(
    stream_window=st.integers(1024, 65536),
    conn_room=st.one_of(st.integers(1024, 8192), st.integers(1024, 8 * 65536)),
    frame_size=st.sampled_from([1024, 4096, 16384]),
    max_bytes=st.integers(1024, 1 << 17),
)
def test_stalled_reader_does_not_block_other_streams(
    stream_window: int, conn_room: int, frame_size: int, max_bytes: int
) -> None:
    """Three 1 MiB responses; the relay never reads the first. The other two must still complete.

    The connection window exceeds the stream window by `conn_room` (at least 1024 octets, so that the test
    stays quick): that room is all the siblings get while the stalled stream holds a full window."""
    relay_settings = Settings(
        max_frame_size=frame_size,
        initial_stream_window=stream_window,
        connection_window=stream_window + conn_room,
    )
    relay, agent = connected_pair(relay_settings, Settings())
    stalled, *others = [relay.open_stream(RequestHead(b"GET", b"/%d" % i), end_stream=True) for i in range(3)]
    to_send: dict[int, int] = {}
    sent: dict[int, int] = {}
    received = dict.fromkeys([stalled, *others], 0)
    ended: set[int] = set()

    while not ended.issuperset(others):
        for stream_id, left in to_send.items():
            if left and agent.outbound_buffered(stream_id) < OUTBOUND_CAP:
                size = min(left, OUTBOUND_CAP)
                agent.send_data(stream_id, payload(stream_id, sent[stream_id], size), end_stream=size == left)
                to_send[stream_id] -= size
                sent[stream_id] += size
        to_agent = relay.data_to_send(max_bytes)
        for event in agent.receive_data(to_agent):
            if isinstance(event, StreamOpened):
                agent.send_reply(event.stream_id, ResponseHead(200, b"OK"))
                to_send[event.stream_id] = MIB
                sent[event.stream_id] = 0
        to_relay = agent.data_to_send(max_bytes)
        for event in relay.receive_data(to_relay):
            if isinstance(event, DataReceived):
                data = event.data
                assert data == payload(event.stream_id, received[event.stream_id], len(data))
                received[event.stream_id] += len(data)
                if event.stream_id != stalled:
                    relay.acknowledge_received_data(event.stream_id, len(data))
            elif isinstance(event, StreamEnded):
                ended.add(event.stream_id)
        assert to_agent or to_relay, (
            f"deadlock: received {received}, stalled stream holds {relay.received_unacknowledged(stalled)}"
        )
        assert received[stalled] <= stream_window

    assert all(received[s] == MIB for s in others)
    assert relay.received_unacknowledged(stalled) == received[stalled] <= stream_window


def test_stalled_reader_with_connection_window_under_two_stream_windows() -> None:
    """Regression: stream window 4096, connection window 6144. A stalled stream holds 4096, leaving 2048
    that its sibling uses, reads and acknowledges; 2048 < 6144 / 2, so credit batched strictly to half the
    window never went out and the sibling stalled for good (SPEC 8: a slow consumer must push back on exactly
    its own sender)."""
    relay, agent = connected_pair(Settings(initial_stream_window=4096, connection_window=6144), Settings())
    stalled = relay.open_stream(RequestHead(b"GET", b"/stalled"), end_stream=True)
    sibling = relay.open_stream(RequestHead(b"GET", b"/sibling"), end_stream=True)
    for event in agent.receive_data(relay.data_to_send()):
        if isinstance(event, StreamOpened):
            agent.send_reply(event.stream_id, ResponseHead(200, b"OK"))
            agent.send_data(event.stream_id, payload(0, 0, 3 * 4096), end_stream=True)
    ended = False
    for _ in range(100):
        for event in relay.receive_data(agent.data_to_send()):
            if isinstance(event, DataReceived) and event.stream_id == sibling:
                relay.acknowledge_received_data(sibling, len(event.data))
            ended |= isinstance(event, StreamEnded) and event.stream_id == sibling
        agent.receive_data(relay.data_to_send())
    assert relay.received_unacknowledged(stalled) == 4096
    assert ended, f"sibling stuck: the agent's connection window is {agent.connection_send_window}"


@given(
    streams=st.integers(2, 8),
    frame_size=st.sampled_from([1024, 4096, 16384]),
    budgets=st.lists(st.integers(10, 1 << 16), min_size=1, max_size=10),
    late=st.integers(0, 3),
)
def test_data_frames_round_robin(streams: int, frame_size: int, budgets: list[int], late: int) -> None:
    """SPEC 9: among any K consecutive DATA frames, each of K busy streams (with window) has one."""
    wide = Settings(max_frame_size=frame_size, initial_stream_window=MAX_WINDOW, connection_window=MAX_WINDOW)
    relay, _agent = connected_pair(Settings(), wide)
    ids = [relay.open_stream(RequestHead(b"POST", b"/")) for _ in range(streams)]
    # Some streams get their data later than others: the rotation must absorb newcomers too.
    for stream_id in ids[late:]:
        relay.send_data(stream_id, payload(stream_id, 0, MIB))
    sequence: list[int] = []
    calls = 0
    while calls <= 3 or len(sequence) < 6 * streams:
        data = relay.data_to_send(budgets[calls % len(budgets)])
        calls += 1
        sequence += [f.stream_id for f in parse_frames(data) if f.type == FrameType.DATA]
        if calls == 3:
            for stream_id in ids[:late]:
                relay.send_data(stream_id, payload(stream_id, 0, MIB))
            sequence.clear()  # count from when every stream is busy
    for start in range(len(sequence) - streams + 1):
        window = sequence[start : start + streams]
        assert sorted(window) == sorted(ids), f"DATA frames {start}..{start + streams}: {window}"


@st.composite
def transcripts(draw: st.DrawFn) -> bytes:
    """Everything an agent sends in a random conversation it drives alone (OPENs, DATA, TRAILERS, RESETs,
    PINGs, GOAWAY), pulled with random budgets."""
    relay_settings = Settings(max_frame_size=draw(st.sampled_from([1024, 16384])))
    relay = Connection(Role.ACCEPTOR, relay_settings)
    agent = Connection(Role.DIALER, Settings())
    out = [agent.data_to_send()]
    agent.receive_data(relay.data_to_send())
    ids: list[int] = []
    for _ in range(draw(st.integers(1, 25))):
        action = draw(st.sampled_from(["open", "data", "end", "trailers", "reset", "ping", "goaway", "pull"]))
        pick = ids[draw(st.integers(0, len(ids) - 1))] if ids else 0
        try:
            if action == "open":
                head = RequestHead(b"PUT", draw(st.binary(min_size=1, max_size=30)), ((b"a", b"b"),))
                ids.append(agent.open_stream(head, end_stream=draw(st.booleans())))
            elif action == "data" and ids:
                size = draw(st.integers(0, 5000))
                agent.send_data(pick, payload(pick, 0, size), end_stream=draw(st.booleans()))
            elif action == "end" and ids:
                agent.end_stream(pick)
            elif action == "trailers" and ids:
                agent.send_trailers(pick, [(b"x-checksum", b"1234")])
            elif action == "reset" and ids:
                agent.reset_stream(pick, draw(st.sampled_from(ErrorCode)))
            elif action == "ping":
                agent.ping(draw(st.binary(min_size=8, max_size=8)))
            elif action == "goaway":
                agent.goaway(ErrorCode.NO_ERROR, b"bye")
            elif action == "pull":
                out.append(agent.data_to_send(draw(st.integers(1, 20000))))
        except LocalProtocolError:
            pass  # an action the state does not allow (e.g. data after END): nothing was queued
    while agent.has_data_to_send:
        chunk = agent.data_to_send()
        if not chunk:
            break
        out.append(chunk)
    return b"".join(out)


def _feed(chunks: list[bytes]) -> list[Event]:
    relay = Connection(Role.ACCEPTOR, Settings())
    events: list[Event] = []
    for chunk in chunks:
        events += relay.receive_data(chunk)
    return events


@given(transcript=transcripts(), cuts=st.lists(st.integers(0, 1 << 17), max_size=40))
def test_any_split_gives_the_same_events(transcript: bytes, cuts: list[int]) -> None:
    """SPEC 2: a receiver must accept any grouping. The core delivers each DATA frame whole, so the events
    are identical (not merely the same bytes per stream) whatever the split."""
    whole = normalized(_feed([transcript]))
    assert whole and whole[0][0] == "HandshakeComplete"
    points = sorted({c % (len(transcript) + 1) for c in cuts})
    pieces = [transcript[a:b] for a, b in zip([0, *points], [*points, len(transcript)], strict=True)]
    assert normalized(_feed(pieces)) == whole


@given(transcript=transcripts())
def test_one_octet_at_a_time_gives_the_same_events(transcript: bytes) -> None:
    whole = normalized(_feed([transcript]))
    octets = [transcript[i : i + 1] for i in range(len(transcript))]
    assert normalized(_feed(octets)) == whole


def test_connection_credit_threshold_is_the_receivers_own_max_frame_size() -> None:
    # SPEC 8: "one MAX_FRAME_SIZE" is the receiver's (the largest DATA the peer may send it). With 2536 octets
    # of connection window left to the sender, a receiver whose own MAX_FRAME_SIZE is 4096 credits the 1000
    # octets its application consumed at once; by the sender's MAX_FRAME_SIZE (1024) it would wait.
    relay = Connection(
        Role.ACCEPTOR, Settings(max_frame_size=4096, connection_window=65536, initial_stream_window=65536)
    )
    agent = Connection(Role.DIALER, Settings(max_frame_size=1024))
    relay.receive_data(agent.data_to_send())
    agent.receive_data(relay.data_to_send())
    stalled = relay.open_stream(RequestHead(b"GET", b"/stalled"), end_stream=True)
    consumed = relay.open_stream(RequestHead(b"GET", b"/consumed"), end_stream=True)
    agent.receive_data(relay.data_to_send())
    for stream_id, size in ((stalled, 62000), (consumed, 1000)):
        agent.send_reply(stream_id, ResponseHead(200, b"OK"))
        agent.send_data(stream_id, bytes(size))
    relay.receive_data(agent.data_to_send(1 << 20))
    assert relay.data_to_send() == b""  # nothing consumed yet: nothing to credit
    relay.acknowledge_received_data(consumed, 1000)
    credit = relay.data_to_send()
    assert credit == b"\x00\x00\x04\x05\x00\x00\x00\x00\x00" + (1000).to_bytes(4, "big")
