"""The lean ACK-only build (``_quic._ack_only``) sends what aioquic's full pass would.

Two connections in memory (no sockets, a made-up clock): the client PINGs, the coordinator
side answers with an ACK, built by the lean path or, with it switched off, by aioquic's full
pass; both must give the same packet and leave the same state behind.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from quic_pair import Pair


def _answer(pair: Pair, *, lean: bool) -> dict[str, Any]:
    """The server's answer to a PING, and what it changed."""
    server = pair.server
    if not lean:
        server.ack_only_datagrams = lambda now: None  # type: ignore[method-assign]
    space = server._spaces[tls.Epoch.ONE_RTT]
    first = server._packet_number
    built = server.datagrams_to_send(pair.now)
    if not lean:
        del server.ack_only_datagrams
    sent = space.sent_packets.get(first)
    pacer = server._loss._pacer
    answer = {
        "sizes": [len(data) for data, _ in built],
        "packets": server._packet_number - first,
        "ack_eliciting": sent is not None and sent.is_ack_eliciting,
        "in_flight": sent is not None and sent.in_flight,
        "ack_due": space.ack_at,
        "pacing_at": server._pacing_at,
        "bucket": (pacer.bucket_time, pacer.evaluation_time - pair.now),
        "timer": server.get_timer(),
    }
    acked_before = len(pair.client._spaces[tls.Epoch.ONE_RTT].sent_packets)
    pair.to_client(built)
    answer["client_acked"] = acked_before - len(pair.client._spaces[tls.Epoch.ONE_RTT].sent_packets)
    return answer


def test_the_ack_of_a_ping_is_the_same_either_way() -> None:
    pair = Pair()
    calls: list[bool] = []
    lean_build = pair.server.ack_only_datagrams

    def counting(now: float) -> Any:
        result = lean_build(now)
        calls.append(result is not None)
        return result

    answers = {True: [], False: []}  # type: dict[bool, list[dict[str, Any]]]
    for n in range(6):
        lean = n % 2 == 0
        pair.ping_server()
        if lean:
            pair.server.ack_only_datagrams = counting  # type: ignore[method-assign]
        answers[lean].append(_answer(pair, lean=lean))
        if lean:
            del pair.server.ack_only_datagrams
        # the time since the last PING differs by nothing but the made-up clock
        for key in ("ack_due", "pacing_at", "timer"):
            value = answers[lean][-1][key]
            answers[lean][-1][key] = None if value is None else value - pair.now
    assert calls, "the lean path was not asked"
    assert all(calls), "the lean path was not taken"
    assert answers[True] == answers[False]
    first = answers[True][0]
    assert first["sizes"]
    assert len(first["sizes"]) == 1
    assert first["packets"] == 1
    assert not first["ack_eliciting"]
    assert not first["in_flight"]
    assert first["ack_due"] is None
    assert first["client_acked"] == 1


def test_anything_else_to_send_takes_the_full_pass() -> None:
    pair = Pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(sid, b"hello")
    pair.ping_server()
    assert pair.server._spaces[tls.Epoch.ONE_RTT].ack_at is not None
    reply = pair.server.get_next_available_stream_id()
    pair.server.send_stream_data(reply, b"world")
    assert pair.server.ack_only_datagrams(pair.now) is None
    pair.server.send_ping(0)
    assert pair.server.ack_only_datagrams(pair.now) is None
    # ... which sends the ACK with the rest, in one packet
    built = pair.server.datagrams_to_send(pair.now)
    assert len(built) == 1
    assert pair.server._spaces[tls.Epoch.ONE_RTT].ack_at is None
