"""A QUIC client that is not ours (aioquic) poking a Phalanx node.

Run by transport/tests/transport_interop_aioquic.rs. Prints one JSON line describing what
happened; the Rust test checks it together with the node's events.

Modes:
  no-cert          connect without a client certificate, then try a hello and a frame
  junk-hello       valid certificate and ALPN, junk bytes instead of the hello
  hello-then-junk  valid certificate, a correct hello, then junk on a unidirectional stream
"""

import argparse
import asyncio
import json
import struct

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived

# transport/src/codec.rs: PROTOCOL_VERSION, passed by the test (--protocol-version) so the two
# cannot drift apart; the ALPN is `phalanx/<version>`.
PROTOCOL_VERSION = None


def junk_frame() -> bytes:
    """The junk sent on a unidirectional stream after a good hello: a 5-byte frame of the next
    protocol version, which the node does not speak."""
    return struct.pack("<I", 5) + struct.pack("<H", PROTOCOL_VERSION + 1) + b"\x00\x00\x00"


# The junk sent instead of a hello: its first 4 bytes, read as a length, are far too large.
JUNK_HELLO = b"this is not a phalanx hello"


def varint(value: int) -> bytes:
    """bincode 2 `config::standard()` unsigned integer encoding."""
    if value < 251:
        return bytes([value])
    if value < 1 << 16:
        return b"\xfb" + struct.pack("<H", value)
    if value < 1 << 32:
        return b"\xfc" + struct.pack("<I", value)
    return b"\xfd" + struct.pack("<Q", value)


def hello_frame(node_id: int, incarnation: int) -> bytes:
    """A Phalanx frame whose header is Hello { protocol_version, node_id, incarnation }."""
    header = varint(PROTOCOL_VERSION) + varint(node_id) + varint(incarnation)
    body = struct.pack("<H", PROTOCOL_VERSION) + struct.pack("<I", len(header)) + header
    return struct.pack("<I", len(body)) + body


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        loop = asyncio.get_running_loop()
        self.terminated = loop.create_future()
        self.streams = {}
        self.finished = {}

    def stream_finished(self, stream_id):
        if stream_id not in self.finished:
            self.finished[stream_id] = asyncio.get_running_loop().create_future()
        return self.finished[stream_id]

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            self.streams[event.stream_id] = self.streams.get(event.stream_id, b"") + event.data
            if event.end_stream and not self.stream_finished(event.stream_id).done():
                self.stream_finished(event.stream_id).set_result(self.streams[event.stream_id])
        elif isinstance(event, ConnectionTerminated):
            if not self.terminated.done():
                self.terminated.set_result(
                    {"code": event.error_code, "application": event.frame_type is None, "reason": event.reason_phrase}
                )
            for future in self.finished.values():
                if not future.done():
                    future.set_exception(ConnectionError("terminated"))


async def run(args) -> dict:
    config = QuicConfiguration(is_client=True, alpn_protocols=[f"phalanx/{PROTOCOL_VERSION}"], server_name=args.server_name, idle_timeout=10)
    config.load_verify_locations(cafile=args.ca)
    if args.mode != "no-cert":
        config.load_cert_chain(args.cert, args.key)
    result = {"mode": args.mode, "connected": False, "hello_answered": False, "terminated": None}
    try:
        async with connect(args.host, args.port, configuration=config, create_protocol=Client) as client:
            # With TLS 1.3 the client may finish its handshake before the server checked
            # the client's certificate: "connected" proves nothing about being accepted.
            result["connected"] = True
            quic = client._quic
            hello_stream = quic.get_next_available_stream_id()
            if args.mode == "junk-hello":
                quic.send_stream_data(hello_stream, JUNK_HELLO, end_stream=True)
            else:
                quic.send_stream_data(hello_stream, hello_frame(args.node_id, 0x1234_5678_9ABC_DEF0), end_stream=True)
            client.transmit()
            try:
                answer = await asyncio.wait_for(client.stream_finished(hello_stream), args.timeout)
                result["hello_answered"] = len(answer) > 4
            except (ConnectionError, asyncio.TimeoutError):
                pass
            if args.mode in ("no-cert", "hello-then-junk"):
                uni = quic.get_next_available_stream_id(is_unidirectional=True)
                payload = junk_frame() if args.mode == "hello-then-junk" else hello_frame(args.node_id, 1)
                try:
                    quic.send_stream_data(uni, payload, end_stream=True)
                    client.transmit()
                except Exception as err:  # the connection may already be closed
                    result["send_error"] = repr(err)
            try:
                result["terminated"] = await asyncio.wait_for(asyncio.shield(client.terminated), args.timeout)
            except asyncio.TimeoutError:
                pass
    except ConnectionError as err:
        result["connect_error"] = repr(err)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--server-name", default="node-0")
    parser.add_argument("--node-id", type=int, default=3)
    parser.add_argument("--mode", choices=["no-cert", "junk-hello", "hello-then-junk"], required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--protocol-version", type=int, required=True)
    args = parser.parse_args()
    global PROTOCOL_VERSION
    PROTOCOL_VERSION = args.protocol_version
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
