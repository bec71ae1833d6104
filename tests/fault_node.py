"""A client that streams numbered messages to a peer until it is killed (see test_faults.py).

Run as ``python fault_node.py --port P --ca PEM --id ID --peer PEER --mode proxied|direct``.
It connects to the coordinator on 127.0.0.1, opens a stream to ``PEER`` (through the
coordinator, or over a direct channel it opens first), prints ``open`` and then sends
messages 0, 1, 2, ... as fast as flow control lets it, each ``--size`` bytes: its number
(8 bytes, big-endian), then a filler byte that depends on the number. The peer is expected
to answer every message with its number (8 bytes); the node checks that the answers come
back in order and prints ``acked N`` whenever message N (a multiple of 100) was answered:
it and every message before it were certainly delivered. With ``--count N`` it sends N
messages only, prints ``all N acked`` once all are answered, and keeps the stream open
without sending more. It runs until it is killed, or for ``--life`` seconds at most.
"""

from __future__ import annotations

import argparse
import sys

import trio

import conec_trio

HEADER = 8


def say(line: str) -> None:
    print(line, flush=True)


def numbered(n: int, size: int) -> bytes:
    """Message ``n`` as test_faults.py checks it: its number, then a filler that depends on it."""
    return n.to_bytes(HEADER, "big") + bytes([n % 251]) * max(0, size - HEADER)


async def send_numbered(send: trio.abc.SendChannel[bytes], size: int, count: int) -> None:
    """Messages 0, 1, ... (``count`` of them, or forever if 0); then the stream stays open."""
    n = 0
    while count == 0 or n < count:
        await send.send(numbered(n, size))
        n += 1
    await trio.sleep_forever()


async def read_acks(recv: trio.abc.ReceiveChannel[bytes], count: int) -> None:
    expected = 0
    async for ack in recv:
        got = int.from_bytes(ack, "big")
        if got != expected:
            say(f"bad ack {got}, expected {expected}")
            raise SystemExit(2)
        if got % 100 == 0:
            say(f"acked {got}")
        expected += 1
        if expected == count:
            say(f"all {count} acked")


async def main(args: argparse.Namespace) -> None:
    config = conec_trio.ClientConfig(
        id=args.id,
        coord_host="127.0.0.1",
        coord_port=args.port,
        ca=args.ca,
        idle_timeout=args.idle_timeout,
    )
    with trio.fail_after(args.life):
        async with conec_trio.open_client(config) as client:
            if args.mode == "direct":
                await client.new_channel(args.peer)
                send, recv = await client.new_direct_stream(args.peer)
            else:
                send, recv = await client.new_proxied_stream(args.peer)
            say("open")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_numbered, send, args.size, args.count)
                nursery.start_soon(read_acks, recv, args.count)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="the coordinator's UDP port")
    parser.add_argument("--ca", required=True, help="PEM file trusted for the coordinator")
    parser.add_argument("--id", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--mode", choices=["proxied", "direct"], required=True)
    parser.add_argument("--size", type=int, default=200, help="bytes per message")
    parser.add_argument("--count", type=int, default=0, help="messages to send (0: no end)")
    parser.add_argument("--idle-timeout", type=float, default=None)
    parser.add_argument("--life", type=float, default=30.0, help="hard bound on run time (s)")
    trio.run(main, parser.parse_args())
    sys.exit(0)
