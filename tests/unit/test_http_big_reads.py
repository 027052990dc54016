"""big_reads: bigger socket reads while a big body arrives, on a real asyncio transport."""

import asyncio

from edged.transports.http_body import READ_BYTES, big_reads


def test_bigger_reads_only_while_a_big_body_arrives():
    async def scenario() -> list:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        transport = writer.transport
        seen = [transport.max_size]
        with big_reads(transport, 3_000_000):
            seen.append(transport.max_size)
        seen.append(transport.max_size)
        with big_reads(transport, 100 << 20):
            seen.append(transport.max_size)
        with big_reads(transport, 1000):  # smaller than asyncio's own reads: left alone
            seen.append(transport.max_size)
        with big_reads(transport, None):
            seen.append(transport.max_size)
        seen.append("max_size" in vars(transport))
        writer.close()
        server.close()
        await server.wait_closed()
        return seen

    default, during, after, huge, small, unknown, own_attribute = asyncio.run(scenario())
    assert default == 256 * 1024
    assert during == 3_000_000 and after == default
    assert huge == READ_BYTES
    assert small == unknown == default
    assert own_attribute is False  # the class's value is back, not a copy of it


def test_transports_without_max_size_are_left_alone():
    class Other:  # what uvloop's or a TLS transport looks like to big_reads: no max_size
        pass

    other = Other()
    with big_reads(other, 3_000_000):
        assert not hasattr(other, "max_size")
    assert not hasattr(other, "max_size")
