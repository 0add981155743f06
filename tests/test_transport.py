"""Wire format, broker, client and peer agent (in-process, loopback)."""

import threading
import time

import msgpack
import pytest
import zmq

from sglang_tokenlake.cluster import wait_until
from sglang_tokenlake.transport.auth import keygen, load_curve_keys, start_authenticator
from sglang_tokenlake.transport.broker import Broker
from sglang_tokenlake.transport.client import Client, RemoteError
from sglang_tokenlake.transport.frames import FrameError, decode, encode
from sglang_tokenlake.transport.peers import BackPressure, PeerAgent, PeerError
from sglang_tokenlake.transport.wake import Waker

# -- frames -------------------------------------------------------------------------------


def test_roundtrip_with_buffers():
    bufs = [b"abc", bytearray(b"\x00" * 10), memoryview(b"xyz")]
    msg = decode(encode("put", 42, {"keys": [1, 2 ** 63 + 5], "tokens": [b"\x01"]}, bufs))
    assert (msg.kind, msg.id) == ("put", 42)
    assert msg.header == {"keys": [1, 2 ** 63 + 5], "tokens": [b"\x01"]}
    assert [bytes(b) for b in msg.buffers] == [b"abc", b"\x00" * 10, b"xyz"]


def _hdr(**kw):
    h = {"v": 1, "t": "get", "id": 1, "b": []}
    h.update(kw)
    return msgpack.packb(h)


@pytest.mark.parametrize("frames, why", [
    ([], "empty"),
    ([b"\xc1\xc1"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([_hdr(v=2)], "version"),
    ([_hdr(t=5)], "no message kind"),
    ([_hdr(id=True)], "integer request id"),
    ([_hdr(id="1")], "integer request id"),
    ([_hdr(b=[1])], "announces 1 buffers"),
    ([_hdr(b=[3]), b"ab"], "buffer 0 has 2 bytes"),
    ([_hdr(b=[-1]), b""], "buffer size list"),
    ([_hdr(b="x")], "buffer size list"),
    ([_hdr(t="nope")], "unknown message kind"),
    ([encode("get", 1)[0][:5]], "not valid msgpack"),
])
def test_malformed_frames_raise(frames, why):
    with pytest.raises(FrameError, match=why):
        decode(frames, frozenset({"get"}))


def test_reserved_header_keys_refused():
    with pytest.raises(ValueError):
        encode("get", 1, {"b": [1]})


# -- broker + client ------------------------------------------------------------------------


@pytest.fixture
def broker():
    release = threading.Event()

    def later(req):
        threading.Thread(target=lambda: req.reply("late", {"n": req.msg.header["n"] + 1})).start()

    def boom(req):
        raise RuntimeError("handler bug")

    def never(req):
        release.wait(0)  # never answers

    b = Broker("tcp://127.0.0.1:0", {
        "ping": lambda r: r.reply("pong"),
        "echo": lambda r: r.reply("echo", r.msg.header, [bytes(x) for x in r.msg.buffers]),
        "later": later, "boom": boom, "never": never,
        "fail": lambda r: r.error("nope", code=7),
    })
    ep = b.start()
    yield b, ep
    b.close()


def test_request_reply_and_buffers(broker):
    b, ep = broker
    with Client(ep) as c:
        assert c.request("ping").kind == "pong"
        m = c.request("echo", {"x": 1}, [b"12345"])
        assert m.header == {"x": 1} and bytes(m.buffers[0]) == b"12345"
        assert c.request("later", {"n": 1}).header == {"n": 2}  # answered from another thread
        with pytest.raises(RemoteError, match="nope"):
            c.request("fail")


def test_handler_errors_and_timeouts_leave_the_broker_serving(broker):
    b, ep = broker
    with Client(ep) as c:
        with pytest.raises(TimeoutError):
            c.request("boom", timeout=0.5)
        with pytest.raises(TimeoutError):
            c.request("never", timeout=0.5)
        assert c.request("ping").kind == "pong"  # the late/missing replies did not confuse it
    assert b.counters["handler_errors"] == 1


def test_malformed_messages_are_counted_and_dropped(broker):


    b, ep = broker
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ep)
    for i in range(300):
        s.send_multipart([bytes([i % 256]) * (i % 7)] if i % 3 else [_hdr(t="unknown")])
    with Client(ep) as c:
        assert c.request("ping").kind == "pong"
    wait_until(lambda: b.counters["malformed"] >= 300, 5,
               lambda: f"300 malformed messages counted, got {b.counters['malformed']}")
    assert b.counters["malformed"] == 300
    s.close()


def test_bind_error_is_reported():
    b1 = Broker("tcp://127.0.0.1:0", {})
    ep = b1.start()
    with pytest.raises(zmq.ZMQError, match="Address already in use"):
        Broker(ep, {}).start()
    b1.close()


# -- peer agent -------------------------------------------------------------------------------


def _wait_connected(agent, peer):
    """The first ping ``peer`` answers (the agent connects in the background)."""
    def pong():
        try:
            return agent.request(peer, "ping", timeout=2).result(5)
        except ConnectionError:
            return None

    return wait_until(pong, 10, f"{peer} to answer a ping", interval=0.02)


def test_agent_requests_timeouts_and_backpressure(broker):
    b, ep = broker
    ticks = []
    agent = PeerAgent(heartbeat_interval=0.05, on_tick=lambda: ticks.append(1), max_inflight=3)
    agent.start()
    try:
        agent.connect("srv", ep)
        assert _wait_connected(agent, "srv").kind == "pong"
        fut = agent.request("srv", "echo", {"k": [1, 2]}, [b"kv"])
        assert bytes(fut.result(5).buffers[0]) == b"kv"
        with pytest.raises(PeerError, match="nope"):
            agent.request("srv", "fail").result(5)
        slow = [agent.request("srv", "never", timeout=0.3) for _ in range(3)]
        with pytest.raises(BackPressure):
            agent.request("srv", "ping").result(1)
        for f in slow:
            with pytest.raises(TimeoutError):
                f.result(5)
        assert agent.request("srv", "ping").result(5).kind == "pong"  # capacity came back
        with pytest.raises(ConnectionError, match="unknown peer"):
            agent.request("nobody", "ping").result(5)
        agent.connect("bad", 12345)  # a broken address must not stop the agent
        assert agent.request("srv", "ping").result(5).kind == "pong"
        assert len(ticks) > 3
    finally:
        agent.close()


def test_direct_requests_skip_the_agent_thread_and_are_received_by_their_sender(broker):
    b, ep = broker
    agent = PeerAgent(heartbeat_interval=10.0)
    agent.start()
    try:
        agent.connect("srv", ep)
        _wait_connected(agent, "srv")

        def direct_echo():  # the first direct request may find its own socket still connecting
            f = agent.request("srv", "echo", {"k": 1}, [b"q"], direct=True)
            return f if agent.counters["direct_sent"] else f.result(5) and None

        first = wait_until(direct_echo, 10, "a direct socket to connect", interval=0.02)
        sent_by_agent = agent.counters["sent"]
        got = []
        first.add_done_callback(lambda f: got.append(threading.get_ident()))
        assert bytes(first.result(5).buffers[0]) == b"q"
        assert got == [threading.get_ident()]  # resolved on this thread, as it waited
        futs = [agent.request("srv", "echo", {"i": i}, direct=True) for i in range(3)]
        assert [f.result(5).header["i"] for f in reversed(futs)] == [2, 1, 0]
        with pytest.raises(PeerError, match="nope"):
            agent.request("srv", "fail", direct=True).result(5)
        assert agent.counters["sent"] == sent_by_agent  # none of them went through the agent
        assert agent.counters["direct_replies"] == 5
        # A reply only its sender can read; another thread's wait is refused.
        fut = agent.request("srv", "ping", direct=True)
        errors = []
        t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, fut.result, 5)))
        t.start()
        t.join()
        assert errors and fut.result(5).kind == "pong"
        # A reply that came while this thread was busy is read even with no time left.
        fut = agent.request("srv", "ping", direct=True)
        time.sleep(0.2)
        assert fut.result(0).kind == "pong"
        # The caller's own timeout leaves the request pending; its deadline fails it.
        slow = agent.request("srv", "never", timeout=0.3, direct=True)
        with pytest.raises(TimeoutError):
            slow.result(0.05)
        assert not slow.done()
        with pytest.raises(TimeoutError, match="no reply"):
            slow.result(5)
        assert agent.counters["direct_timeouts"] == 1
        # A reconnected peer gets a fresh socket; the old one's requests fail at once.
        stale = agent.request("srv", "never", timeout=5, direct=True)
        agent.connect("srv", ep)
        wait_until(lambda: agent.request("srv", "ping", direct=True).result(5).kind == "pong"
                   and agent.counters["direct_sent"] > 8, 10, "a new direct socket")
        with pytest.raises(ConnectionError, match="reconnected or left"):
            stale.result(0)
    finally:
        agent.close()
    # After close a direct request falls back to the stopped agent: its caller times out.
    with pytest.raises(TimeoutError):
        agent.request("srv", "ping", direct=True).result(0.1)


def test_agent_against_a_dead_peer_fails_fast():
    agent = PeerAgent(heartbeat_interval=0.05)
    agent.start()
    try:
        agent.connect("dead", "127.0.0.1:1")
        with pytest.raises(ConnectionError):
            agent.request("dead", "ping", timeout=0.5).result(5)
    finally:
        agent.close()


def test_agent_closed_before_start_releases_its_sockets():
    agent = PeerAgent()
    agent.connect("x", "127.0.0.1:1")  # queued, never sent
    agent.close()
    agent.connect("y", "127.0.0.1:1")  # waking a closed agent is a no-op


# -- waker ----------------------------------------------------------------------------------


def test_waker_wakes_a_poller_from_any_thread_and_closes():
    w = Waker(zmq.Context.instance())
    poller = zmq.Poller()
    poller.register(w.socket, zmq.POLLIN)
    assert not poller.poll(0)
    threads = [threading.Thread(target=w.wake) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert poller.poll(2000)
    w.drain()
    assert not poller.poll(0)
    w.wake()
    w.wake()  # a pending wake-up absorbs the second
    assert poller.poll(2000)
    w.drain()
    poller.unregister(w.socket)
    w.close()
    assert w.socket.closed
    w.wake()  # after close: nothing to wake, no error


# -- CURVE ------------------------------------------------------------------------------------


def _free_port():
    from sglang_tokenlake.cluster import free_port

    return free_port()


def test_curve_keys_admit_the_pool_and_refuse_others(tmp_path):
    assert load_curve_keys(None) is None and load_curve_keys("") is None
    with pytest.raises(FileNotFoundError, match="tokenlake keygen"):
        load_curve_keys(str(tmp_path / "missing"))
    port = _free_port()
    member = f"127.0.0.1:{port}"
    keygen(str(tmp_path / "pool"), "w0", member)
    keygen(str(tmp_path / "pool"), "w1", "127.0.0.1:1")
    keygen(str(tmp_path / "other"), "w0", member)  # valid CURVE, but not the pool's keys
    keys = load_curve_keys(str(tmp_path / "pool"), member=member)
    peer_keys = load_curve_keys(str(tmp_path / "pool"), "w1")
    assert keys is not None and keys.member == member and len(keys.secret) == 40
    assert peer_keys is not None and keys.server_key(member) == keys.public
    ctx = zmq.Context()  # its own authenticator, so other tests' brokers stay open
    try:
        start_authenticator(ctx, str(tmp_path / "pool"))
        b = Broker(f"tcp://{member}", {"ping": lambda r: r.reply("pong", {"user": r.user})},
                   context=ctx, curve_public_key=keys.public, curve_secret_key=keys.secret)
        ep = b.start()
        try:
            with Client(ep, context=ctx, curve=peer_keys) as c:
                reply = c.request("ping", timeout=5)
                assert reply.kind == "pong" and reply.header["user"] == peer_keys.public.decode()
            agent = PeerAgent(context=ctx, curve=peer_keys)
            agent.start()
            try:
                agent.connect(member, ep)
                assert _wait_connected(agent, member).kind == "pong"
            finally:
                agent.close()
            with Client(ep, context=ctx, curve=load_curve_keys(str(tmp_path / "other"))) as c:
                with pytest.raises(TimeoutError):
                    c.request("ping", timeout=1)
        finally:
            b.close()
    finally:
        from sglang_tokenlake.transport.auth import _authenticators

        _authenticators.pop(id(ctx)).stop()
        ctx.term()
