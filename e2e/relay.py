#!/usr/bin/env python3
"""Relays byte streams between a TCP port and a unix socket, one connection for each accepted one.

e2e/envoy-gateway.sh runs Envoy Gateway's controller in a network namespace of its own, where only its
loopback exists; two of these relays give it the local cluster's kube-apiserver at the same address as on
the host, through a unix socket (a path in the filesystem, which both network namespaces see):

    e2e/relay.py --listen-unix PATH --connect-tcp 127.0.0.1:PORT    on the host
    e2e/relay.py --listen-tcp 127.0.0.1:PORT --connect-unix PATH    inside the namespace

The bytes are relayed as they are (TLS end to end: the relays see no plaintext). Runs until killed.
Python standard library only.
"""

import argparse
import asyncio


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    listen = parser.add_mutually_exclusive_group(required=True)
    listen.add_argument("--listen-unix", metavar="PATH")
    listen.add_argument("--listen-tcp", metavar="HOST:PORT")
    connect = parser.add_mutually_exclusive_group(required=True)
    connect.add_argument("--connect-unix", metavar="PATH")
    connect.add_argument("--connect-tcp", metavar="HOST:PORT")
    args = parser.parse_args()

    async def dial():
        if args.connect_unix:
            return await asyncio.open_unix_connection(args.connect_unix)
        host, port = args.connect_tcp.rsplit(":", 1)
        return await asyncio.open_connection(host, int(port))

    async def relay(client_reader, client_writer):
        try:
            server_reader, server_writer = await dial()
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        client_writer.close()
        server_writer.close()

    if args.listen_unix:
        server = await asyncio.start_unix_server(relay, path=args.listen_unix)
    else:
        host, port = args.listen_tcp.rsplit(":", 1)
        server = await asyncio.start_server(relay, host, int(port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
