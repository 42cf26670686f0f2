"""One client's hostile body shape must not starve the relay's other clients.

A chunked body of one-byte chunks is parsed from data already read, without waiting for the network: one
64 KiB read holds ~11,000 chunks. The relay once handled all of them before giving way to any other task, so
another client's small requests waited for whole reads of the attacker's body (p50 1.95 s in an attack run;
bench/fairness.py measures it). Here only the order matters, never the time: the other client's requests are
answered while the upload is still in progress.
"""

from __future__ import annotations

import trio

from ..relay_rig import relay_rig, unless_frozen

CHUNKS = 60_000
UPLOAD = (
    b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"1\r\nX\r\n" * CHUNKS
    + b"0\r\n\r\n"
)


async def test_a_body_of_one_byte_chunks_leaves_other_clients_served() -> None:
    with unless_frozen():
        async with relay_rig() as rig:
            attacker = await rig.connect("192.0.2.66")
            await attacker.send(UPLOAD)  # all of it at once: the relay never waits for the network
            while not rig.agent.seen:
                await trio.lowlevel.checkpoint()
            upload = rig.agent.seen[0]
            other = await rig.connect("192.0.2.7")
            for i in range(3):
                await other.send(b"GET /small/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                status, _, body = await other.response(timeout=100)
                assert (status, body) == (200, b"GET /small/%d 0" % i)
                assert not upload.complete, "the other client was served only after the upload"
            status, _, body = await attacker.response(b"POST", timeout=100)
            assert (status, body) == (200, b"POST /upload %d" % CHUNKS)
