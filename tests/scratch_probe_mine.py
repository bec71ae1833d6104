import dataclasses, time
import trio, pytest
import conec_trio

async def test_streams(coord_config, open_client):
    async with conec_trio.open_coordinator(coord_config(max_streams_per_client=4)) as coord, open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        ends = []
        for i in range(3):
            ends.append(await alice.new_proxied_stream("bob"))
        with trio.move_on_after(0.5):
            await alice.new_proxied_stream("bob")
        print("cancelled")
        inc = await bob.incoming_streams.receive()
        s, r = ends[0]
        await s.aclose(); await inc.send.aclose()
        await r.aclose(); await inc.recv.aclose()
        with trio.move_on_after(2):
            print(await alice.broadcast_count("x") if False else "")
            await alice._conn.closed.wait()
        print("alice conn", alice._conn.is_open, alice._conn.close_error_code, alice._conn.close_reason)
        x = await alice.new_proxied_stream("bob")
        print("opened", x)
