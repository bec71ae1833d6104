"""A peer's consent to a direct channel.

The coordinator grants a channel to the opener as it offers it to the peer, before the peer
said yes. What stands for the peer's yes is its punch and its acceptance of the opener's
certificate in the handshake (the opener waits for the handshake to be confirmed): a peer
that refuses, does not listen or was never asked accepts no handshake, and a refusal ends
the opener's attempt at once, saying why.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import pytest
import trio
from helpers import ClientFactory, wait_for
from rawquic import open_raw_client

import conec_trio
from conec_trio import ChannelError, _direct, _direct_open, _requests, _tls, certs
from conec_trio._wire import control

DEADLINE = 10.0  # seconds: every wait is bounded by it


def _forged_grant(bob: conec_trio.Client) -> Any:
    """A ``request`` for alice that answers her channel request with a grant for bob the
    coordinator never made (bob is never offered anything): his real certificate and
    address, a token of its own."""
    cert = _tls.cert_der(bob._identity().certificate)
    assert bob._socket is not None
    port = bob._socket.local_address[1]
    token = secrets.token_bytes(control.PUNCH_TOKEN_SIZE)

    async def request(make: Any) -> Any:
        msg = make(1)
        assert isinstance(msg, control.ChannelRequest)
        return control.ChannelGrant(msg.rid, "bob", cert, [("127.0.0.1", port)], token)

    return request


def _with_request(client: conec_trio.Client, request: Any) -> Any:
    return dataclasses.replace(client._direct.ctx, request=request)


def _no_channel(alice: conec_trio.Client, bob: conec_trio.Client) -> bool:
    return not alice._direct.channels and not bob._direct.channels


async def test_a_refused_offer_ends_new_channel_at_once_saying_why(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    """bob takes channels only from peers of his CA: alice's grant came before his answer,
    and his refusal ends her attempt with his reason, long before any dial could time out."""
    ca_pem, _ = certs.make_ca("Team CA")
    async with (
        open_client(coord, "alice") as alice,
        open_client(coord, "bob", client_ca=ca_pem) as bob,
    ):
        start = trio.current_time()
        with (
            trio.fail_after(DEADLINE),
            pytest.raises(ChannelError, match=r"peer 'bob' refused the channel: .*client_ca"),
        ):
            await alice.new_channel("bob")
        assert trio.current_time() - start < _direct_open.CHANNEL_TIMEOUT
        assert _no_channel(alice, bob)
        assert alice._direct.opening("bob") is None
        # The refusal ended that attempt only: a next one is answered the same way.
        with trio.fail_after(DEADLINE), pytest.raises(ChannelError, match="refused the channel"):
            await alice.new_channel("bob")


async def test_a_refusal_read_before_its_grant_was_taken_in_still_ends_the_attempt(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    """The refusal can follow the grant so closely that the control stream's reader hands
    it over before the opening task has taken the grant in: it is kept for that grant's
    token, and a refusal for another token (an earlier attempt's) is not."""
    async with open_client(coord, "alice") as alice, open_client(coord, "bob"):
        request = alice._direct.ctx.request

        async def refused_meanwhile(make: Any) -> Any:
            reply = await request(make)
            assert isinstance(reply, control.ChannelGrant)
            stale = bytes(control.PUNCH_TOKEN_SIZE)
            alice._direct.refused("bob", stale, "an earlier attempt's refusal")
            alice._direct.refused("bob", reply.token, "peer 'bob' refused the channel: late")
            return reply

        alice._direct.ctx = _with_request(alice, refused_meanwhile)
        with (
            trio.fail_after(DEADLINE),
            pytest.raises(ChannelError, match="refused the channel: late"),
        ):
            await alice.new_channel("bob")
        assert not alice._direct.channels


async def test_an_offer_never_answered_ends_new_channel_saying_so(
    coord: conec_trio.Coordinator,
    coord_identity: tuple[bytes, bytes],
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mallory takes the offer and never answers it (nor punches, nor takes a handshake):
    alice's attempt ends when the coordinator stops waiting, with its reason."""
    monkeypatch.setattr(_requests, "OFFER_TIMEOUT", 0.5)
    async with (
        open_client(coord, "alice") as alice,
        open_raw_client(coord.address, coord_identity[0], "mallory") as mallory,
    ):
        await mallory.hello()
        with (
            trio.fail_after(DEADLINE),
            pytest.raises(ChannelError, match="peer 'mallory' did not answer the channel offer"),
        ):
            await alice.new_channel("mallory")
        assert not alice._direct.channels


async def test_a_forged_grant_opens_no_channel_to_a_client_that_does_not_listen(
    coord: conec_trio.Coordinator, open_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice knows bob's certificate and address (as a grant would tell her) and dials him
    without his consent: bob, who does not listen, takes no connection at all."""
    monkeypatch.setattr(_direct_open, "CHANNEL_TIMEOUT", 1.0)
    async with (
        open_client(coord, "alice") as alice,
        open_client(coord, "bob", listen=False) as bob,
    ):
        alice._direct.ctx = _with_request(alice, _forged_grant(bob))
        with trio.fail_after(DEADLINE), pytest.raises(ChannelError, match="could not reach"):
            await alice.new_channel("bob")
        assert _no_channel(alice, bob)


async def test_a_forged_grant_opens_no_channel_to_a_client_never_asked(
    coord: conec_trio.Coordinator,
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bob listens, but only for channels from peers of his CA, and the coordinator never
    offered him one from alice: her handshake waits for an offer that never comes, is never
    confirmed, and is refused once the grace is over."""
    monkeypatch.setattr(_direct, "UNVOUCHED_GRACE", 0.5)
    ca_pem, _ = certs.make_ca("Team CA")
    async with (
        open_client(coord, "alice") as alice,
        open_client(coord, "bob", client_ca=ca_pem) as bob,
    ):
        alice._direct.ctx = _with_request(alice, _forged_grant(bob))
        with trio.fail_after(DEADLINE), pytest.raises(ChannelError, match="vouched for"):
            await alice.new_channel("bob")
        assert _no_channel(alice, bob)
        await wait_for(lambda: not bob._direct._unvouched, DEADLINE)


async def test_a_dialler_that_beats_its_offer_is_taken_once_the_offer_comes(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    """bob's offer is late (held back here until alice's handshake has reached him): her
    handshake waits, unconfirmed, and the channel opens as soon as the offer is taken."""
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        manager = bob._direct
        take_offer = manager.offer

        async def late(offer: control.ChannelOffer) -> None:
            await wait_for(lambda: manager._unvouched, DEADLINE)
            (table,) = manager._unvouched
            assert not table.vouched.is_set()
            take_offer(offer)

        def hold_back(offer: control.ChannelOffer) -> None:
            manager.ctx.nursery.start_soon(late, offer)

        manager.offer = hold_back  # type: ignore[method-assign]
        with trio.fail_after(DEADLINE):
            await alice.new_channel("bob")
            send, _ = await alice.new_direct_stream("bob")
            incoming = await bob.incoming_streams.receive()
            await send.send(b"direct")
            assert await incoming.recv.receive() == b"direct"
        assert not manager._unvouched


async def test_the_peer_may_use_the_channel_as_soon_as_new_channel_returns(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    """alice's new_channel returns once her side of the handshake is complete and bob's
    punch said he took the offer: bob's side may still be finishing (here his check of her
    certificate is held back until she has returned), and his first ping and direct stream
    wait for it rather than go through the coordinator or fail."""
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        manager = bob._direct
        vouch = manager._vouch
        returned = trio.Event()

        def vouch_after_alice_returned(table: Any, der: bytes) -> bool:
            async def later() -> None:
                await returned.wait()
                assert vouch(table, der)

            manager.ctx.nursery.start_soon(later)
            return True

        manager._vouch = vouch_after_alice_returned  # type: ignore[method-assign]
        with trio.fail_after(DEADLINE):
            await alice.new_channel("bob")
            returned.set()
            assert "alice" not in manager.channels
            assert (await bob.ping("alice")).path is conec_trio.Path.DIRECT
            send, _ = await bob.new_direct_stream("alice")
            incoming = await alice.incoming_streams.receive()
            await send.send(b"from bob")
            assert await incoming.recv.receive() == b"from bob"
