"""The KV stream (transport/stream.py): pulls over plain TCP, read by the thread that asked."""

import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest

from sglang_tokenlake.cluster import wait_until
from sglang_tokenlake.transport.broker import Broker
from sglang_tokenlake.transport.frames import PeerError, encode
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.transport.stream import StreamServer, read_message, send_message

KV = bytes(range(256)) * 1024  # 256 KiB


def _get(req):
    h = req.msg.header
    if h.get("sleep"):
        time.sleep(h["sleep"])
    if h.get("refuse"):
        req.error("no such segment")
        return
    if h.get("silent"):
        return  # a handler that never answers
    n = h.get("n", 1)
    bufs = [KV[: 1000 * (k + 1)] for k in range(n)] + [KV]
    req.reply("kv", {"i": h.get("i"), "thread": threading.get_ident()}, bufs)


@pytest.fixture
def served():
    """A stream server and a broker with the same ``get``, and an agent that knows both."""
    stream = StreamServer("127.0.0.1", {"get": _get})
    port = stream.start()
    broker = Broker("tcp://127.0.0.1:0", {"get": _get})
    endpoint = broker.start().removeprefix("tcp://")
    agent = PeerAgent(heartbeat_interval=10.0)
    agent.start()
    agent.connect("owner", endpoint)
    agent.set_stream("owner", port)
    yield stream, broker, agent
    agent.close()
    stream.close()
    broker.close()


def test_a_bulk_request_takes_the_stream_and_its_reply_is_exact_and_writable(served):
    stream, broker, agent = served
    msg = agent.request("owner", "get", {"i": 7, "n": 2}, bulk=True).result(5)
    assert msg.header["i"] == 7
    assert [bytes(b) for b in msg.buffers] == [KV[:1000], KV[:2000], KV]
    # Fresh, writable, aligned memory: the pool scatters it into the KV pool without a copy.
    arr = np.frombuffer(msg.buffers[0], dtype=np.uint8)
    assert arr.flags.writeable and arr.ctypes.data % 16 == 0
    assert msg.header["thread"] != threading.get_ident()
    assert agent.counters["stream_replies"] == 1 and agent.counters["sent"] == 0
    assert agent.counters["stream_bytes_received"] == 3000 + len(KV)
    assert broker.counters["received"] == 0 and stream.counters["received"] == 1


def test_replies_come_in_order_and_reading_one_resolves_those_before_it(served):
    _, _, agent = served
    futs = [agent.request("owner", "get", {"i": i}, bulk=True) for i in range(6)]
    assert futs[4].result(5).header["i"] == 4
    assert [f.done() for f in futs] == [True] * 5 + [False]
    assert [f.result(5).header["i"] for f in futs] == list(range(6))
    assert agent.counters["stream_connects"] == 1


def test_an_error_reply_and_an_unanswered_request_fail_only_themselves(served):
    stream, _, agent = served
    refused = agent.request("owner", "get", {"refuse": True}, bulk=True)
    silent = agent.request("owner", "get", {"silent": True}, bulk=True)
    ok = agent.request("owner", "get", {"i": 3}, bulk=True)
    assert ok.result(5).header["i"] == 3
    with pytest.raises(PeerError, match="no such segment"):
        refused.result(0)
    with pytest.raises(PeerError, match="no answer"):
        silent.result(0)
    assert stream.counters["unanswered"] == 1


def test_a_timeout_closes_the_connection_and_the_next_request_reconnects(served):
    _, _, agent = served
    slow = agent.request("owner", "get", {"sleep": 1.0}, timeout=0.2, bulk=True)
    with pytest.raises(TimeoutError):
        slow.result(5)
    assert agent.counters["stream_timeouts"] == 1
    # Its late reply would put the stream out of step: a new connection serves the next one.
    assert agent.request("owner", "get", {"i": 1}, bulk=True).result(5).header["i"] == 1
    assert agent.counters["stream_connects"] == 2


def test_a_caller_timeout_shorter_than_the_requests_keeps_the_stream(served):
    _, _, agent = served
    fut = agent.request("owner", "get", {"sleep": 0.5, "i": 9}, timeout=5, bulk=True)
    with pytest.raises(TimeoutError):
        fut.result(0.05)
    assert fut.result(5).header["i"] == 9
    assert agent.counters["stream_connects"] == 1


def test_a_reply_is_read_only_by_the_thread_that_asked(served):
    _, _, agent = served
    fut = agent.request("owner", "get", {"i": 1}, bulk=True)
    box = []
    t = threading.Thread(target=lambda: box.append(_raises(lambda: fut.result(5))))
    t.start()
    t.join()
    assert isinstance(box[0], RuntimeError)
    assert fut.result(5).header["i"] == 1


def _raises(f):
    try:
        f()
    except Exception as e:
        return e
    return None


def test_without_a_stream_or_when_it_cannot_connect_the_request_takes_zeromq(served):
    stream, broker, agent = served
    agent.set_stream("owner", None)
    wait_until(lambda: _answers(agent), 10, "the broker connected", 0.05)  # ZeroMQ is up
    before = broker.counters["received"]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    agent.set_stream("owner", port)
    assert agent.request("owner", "get", {"i": 2}, bulk=True).result(5).header["i"] == 2
    assert agent.counters["stream_connect_failures"] == 1
    assert broker.counters["received"] == before + 1
    agent.set_stream("owner", None)
    assert agent.request("owner", "get", {"i": 3}, bulk=True).result(5).header["i"] == 3
    assert broker.counters["received"] == before + 2 and stream.counters["received"] == 0


def _answers(agent):
    try:
        return agent.request("owner", "get", {"i": 0}, timeout=1).result(2) is not None
    except ConnectionError:
        return False


def test_with_curve_bulk_requests_never_take_the_stream(served):
    stream, _, agent = served
    agent.curve = object()  # what matters: the agent has keys (so the stream, unencrypted, is off)
    agent.request("owner", "get", {"i": 1}, timeout=0.3, bulk=True).exception(5)
    assert stream.counters["connections"] == 0 and agent.counters["stream_sent"] == 0


def test_an_owner_that_dies_fails_what_waits_on_it():
    stream = StreamServer("127.0.0.1", {"get": _get})
    port = stream.start()
    agent = PeerAgent(heartbeat_interval=10.0)
    agent.start()
    agent.connect("owner", "127.0.0.1:1")
    agent.set_stream("owner", port)
    try:
        fut = agent.request("owner", "get", {"sleep": 0.5}, timeout=5, bulk=True)
        wait_until(lambda: stream.counters["received"] == 1, 5, "the request served", 0.01)
        stream.close()
        with pytest.raises(ConnectionError):
            fut.result(5)
        assert agent.counters["stream_errors"] == 1
    finally:
        agent.close()
        stream.close()


def _raw(port):
    c = socket.create_connection(("127.0.0.1", port))
    c.settimeout(5)
    return c


@pytest.mark.parametrize("garbage, why", [
    (struct.pack("<IQ", 2 << 20, 0), "header"),  # a header over MAX_HEADER_BYTES
    (struct.pack("<IQ", 8, 1 << 40) + b"x" * 8, "buffers"),  # buffers a get never carries
    (struct.pack("<IQ", 2, 0) + b"\xc1\xc1" + bytes(62), "msgpack"),
    (struct.pack("<IQ", 0, 0), "msgpack"),
])
def test_a_malformed_message_closes_its_connection_and_the_server_keeps_serving(garbage, why):
    stream = StreamServer("127.0.0.1", {"get": _get})
    port = stream.start()
    try:
        bad = _raw(port)
        bad.sendall(garbage)
        assert bad.recv(1) == b""  # closed on us, nothing answered
        wait_until(lambda: stream.counters["malformed"] == 1, 5, "the message refused", 0.01)
        good = _raw(port)
        send_message(good, encode("get", 5, {"i": 5}))
        assert read_message(good, None, 1 << 20).header["i"] == 5
    finally:
        stream.close()


def test_an_unknown_kind_and_buffers_disagreeing_with_the_header_are_refused():
    stream = StreamServer("127.0.0.1", {"get": _get}, max_buffer_bytes=100)
    port = stream.start()
    try:
        c = _raw(port)
        send_message(c, encode("put", 1, {}))
        assert c.recv(1) == b""
        head = msgpack.packb({"v": 1, "t": "get", "id": 2, "b": [10]})
        c = _raw(port)  # the prefix says 20 buffer bytes, the header 10
        c.sendall(struct.pack("<IQ", len(head), 20) + head + bytes(64 - len(head)) + bytes(20))
        assert c.recv(1) == b""
        assert stream.counters["malformed"] == 2 and stream.counters["received"] == 0
    finally:
        stream.close()


def test_a_peer_without_a_known_address_is_never_dialled(served):
    stream, _, agent = served
    agent.set_stream("ghost", stream.port)  # a port, but no endpoint: connect() never ran
    with pytest.raises(ConnectionError, match="unknown peer"):
        agent.request("ghost", "get", {"i": 1}, bulk=True).result(5)
    assert agent.counters["stream_connects"] == agent.counters["stream_connect_failures"] == 0
    assert stream.counters["connections"] == 0
