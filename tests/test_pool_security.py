"""Who may do what in a pool: per-worker CURVE keys, 'from' bound to the key, verified puts,
replies matched to the socket that asked, and no unauthenticated bind beyond loopback.

Real brokers and DEALER sockets in one process (no SGLang); the pool side is a
``PoolLink`` over ``pool_fakes``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest
import zmq
from pool_fakes import SEED, FakeAgent, FakeHost, FakeNet, make_pool

from sglang_tokenlake.cluster import PoolSpec, free_port
from sglang_tokenlake.config import TokenLakeConfig, is_loopback
from sglang_tokenlake.pool import PoolLink
from sglang_tokenlake.pool.identity import put_key_mismatch
from sglang_tokenlake.segments import keys_from_bytes, segment_bytes
from sglang_tokenlake.transport.auth import keygen, load_curve_keys, start_authenticator
from sglang_tokenlake.transport.broker import Broker
from sglang_tokenlake.transport.client import Client, RemoteError
from sglang_tokenlake.transport.frames import Message, encode
from sglang_tokenlake.transport.peers import PeerAgent

S = 4
A, B = "127.0.0.1:1", "127.0.0.1:2"  # members that only connect (their brokers are not needed)


# -- keys ------------------------------------------------------------------------------------


def test_keygen_writes_one_pair_per_worker_and_never_overwrites(tmp_path):
    d = str(tmp_path / "keys")
    out = subprocess.run([sys.executable, "-m", "sglang_tokenlake.cli", "keygen", d,
                          "--name", "w0", "--member", A], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "w0.key_secret").st_mode) == 0o600
    assert 'member = "127.0.0.1:1"' in (tmp_path / "keys" / "w0.key").read_text()
    assert "secret-key" not in (tmp_path / "keys" / "w0.key").read_text()
    again = subprocess.run([sys.executable, "-m", "sglang_tokenlake.cli", "keygen", d,
                            "--name", "w0"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    with pytest.raises(ValueError, match="HOST:PORT"):
        keygen(d, "w1", "no-port")


def test_a_worker_uses_the_key_that_names_it(tmp_path):
    d = str(tmp_path)
    keygen(d, "w0", A)
    keygen(d, "w1", B)
    keygen(d, "ops")
    k0 = load_curve_keys(d, member=A)
    assert k0.member == A and k0.server_key(B) == load_curve_keys(d, "w1").public
    assert k0.server_key("tcp://127.0.0.1:2") == k0.server_key(B)
    assert load_curve_keys(d).member is None  # a client takes the status-only key
    with pytest.raises(ValueError, match="not '127.0.0.1:1'"):
        load_curve_keys(d, "w1", member=A)  # another worker's key
    with pytest.raises(FileNotFoundError, match="--member 127.0.0.1:9"):
        load_curve_keys(d, member="127.0.0.1:9")
    other = tmp_path / "elsewhere"
    keygen(str(other), "x", "127.0.0.1:9")
    with pytest.raises(ValueError, match="not in"):
        load_curve_keys(d, str(other / "x.key_secret"))  # not on the allow-list


def test_pool_spec_gives_each_worker_its_own_key(tmp_path):
    spec = PoolSpec((20001, 20002))
    specs = spec.worker_specs("m", curve_dir=str(tmp_path))
    assert [s.extra_args[-1] for s in specs] == ["w0", "w1"]
    for addr, s in zip(spec.broker_addrs, specs):
        assert load_curve_keys(str(tmp_path), s.extra_args[-1], member=addr).member == addr
    assert load_curve_keys(str(tmp_path)).member is None  # the "ops" key for status


# -- the broker: 'from' bound to the key --------------------------------------------------------


@pytest.fixture()
def curve_pool(tmp_path):
    """A PoolLink served by a real CURVE broker; keys for it, for A, B, ops; one outsider."""
    port = free_port()
    me = f"127.0.0.1:{port}"
    d = str(tmp_path / "pool")
    keygen(d, "me", me)
    keygen(d, "a", A)
    keygen(d, "b", B)
    keygen(d, "ops")
    keygen(str(tmp_path / "out"), "a", A)  # names A, but is not on the pool's allow-list
    shutil.copy(tmp_path / "pool" / "me.key", tmp_path / "out")  # knows the broker's key
    keys = load_curve_keys(d, member=me)
    ctx = zmq.Context()
    start_authenticator(ctx, d)
    host = FakeHost(S, 64)
    link = PoolLink(host, TokenLakeConfig(segment_size=S, curve_dir=d), me, curve=keys,
                    agent=FakeAgent(FakeNet(), me))  # type: ignore[arg-type]
    host.pool = link
    broker = Broker(f"tcp://{me}", link.handlers(), context=ctx, curve_public_key=keys.public,
                    curve_secret_key=keys.secret)
    broker.start()
    clients = []

    def client(key: str, directory: str = d) -> Client:
        c = Client(f"tcp://{me}", context=ctx, curve=load_curve_keys(directory, key))
        clients.append(c)
        return c

    try:
        yield link, client, str(tmp_path / "out")
    finally:
        for c in clients:
            c.close()
        broker.close()
        from sglang_tokenlake.transport.auth import _authenticators

        _authenticators.pop(id(ctx)).stop()
        ctx.term()


def _hello(member, members=()):
    return {"from": member, "capacity": 64, "boot": "b", "layout": None, "seq": 0,
            "members": list(members)}


def test_a_member_cannot_speak_for_another(curve_pool):
    link, client, _ = curve_pool
    a = client("a")
    with pytest.raises(RemoteError, match="not the member"):
        a.request("hello", _hello(B), timeout=5)  # A's key, B's id
    assert link.counters["refused_identity"] == 1 and not link.membership.is_alive(B)
    assert a.request("hello", _hello(A), timeout=5).kind == "hello"
    assert link.membership.is_alive(A)
    for kind, h in [("get", {"keys": [1]}), ("sync", {}), ("put", {"keys": [1]}),
                    ("announce", {}), ("attend", {})]:
        with pytest.raises(RemoteError, match="not the member"):
            a.request(kind, {**h, "from": B}, timeout=5)
    assert link.counters["refused_identity"] == 6


def test_a_status_only_key_cannot_join(curve_pool):
    link, client, _ = curve_pool
    ops = client("ops")
    for member in (A, None):
        with pytest.raises(RemoteError, match="not the member"):
            ops.request("hello", _hello(member), timeout=5)
    assert link.membership.alive() == {link.self_id: 64}


def test_a_key_outside_the_allow_list_gets_nothing(curve_pool):
    link, client, outside = curve_pool
    with pytest.raises(TimeoutError):
        client("a", outside).request("hello", _hello(A), timeout=1.5)
    assert not link.membership.is_alive(A)


def test_heartbeats_introduce_only_members_with_keys(curve_pool):
    link, client, _ = curve_pool
    client("a").request("hello", _hello(A, [B, "127.0.0.1:9"]), timeout=5)
    known = set(link.membership.known())
    assert B in known and "127.0.0.1:9" not in known


# -- replies ---------------------------------------------------------------------------------


def test_a_heartbeat_answer_counts_only_from_the_member_asked():
    net = FakeNet()
    hosts = make_pool(net, ["w0:1", "w1:2"], segment_size=S)
    link = hosts["w0:1"].pool
    fut: Future = Future()
    fut.set_result(Message("hello", 1, _hello("w9:9"), []))
    link._hello_reply(fut, "w1:2", time.monotonic())
    assert "w9:9" not in link.membership.known()


def test_a_reply_resolves_only_a_request_sent_on_that_socket():
    ctx = zmq.Context()
    seen = []

    def silent(req):
        seen.append(req.msg.id)  # never answers

    def forger(req):  # answers the other peer's request id first, then its own
        req._broker._send_from_any_thread(req.peer, encode("pong", seen[0], {"forged": True}))
        req.reply("pong")

    quiet = Broker("tcp://127.0.0.1:0", {"ping": silent}, context=ctx)
    loud = Broker("tcp://127.0.0.1:0", {"ping": forger}, context=ctx)
    agent = PeerAgent(context=ctx)
    try:
        eq, el = quiet.start(), loud.start()
        agent.start()
        agent.connect("quiet", eq)
        agent.connect("loud", el)
        deadline = time.monotonic() + 10
        waiting = agent.request("quiet", "ping", timeout=3)
        while not seen and time.monotonic() < deadline:
            if waiting.done():  # not connected yet: ask again
                waiting = agent.request("quiet", "ping", timeout=3)
            time.sleep(0.05)
        assert agent.request("loud", "ping", timeout=5).result(5).kind == "pong"
        with pytest.raises(TimeoutError):
            waiting.result(5)
        assert agent.counters["replies_wrong_peer"] == 1
    finally:
        agent.close()
        quiet.close()
        loud.close()
        ctx.term()


def test_a_peer_without_a_key_is_not_connected(tmp_path):
    keygen(str(tmp_path), "w0", A)
    agent = PeerAgent(curve=load_curve_keys(str(tmp_path), member=A))
    agent.start()
    try:
        agent.connect("127.0.0.1:9", "127.0.0.1:9")
        with pytest.raises(ConnectionError, match="unknown peer"):
            agent.request("127.0.0.1:9", "ping", timeout=2).result(5)
        assert agent.counters["refused_no_key"] == 1
        for _ in range(3):  # nor by a direct request: tried (and logged) once, then not again
            with pytest.raises(ConnectionError, match="unknown peer"):
                agent.request("127.0.0.1:9", "ping", timeout=2, direct=True).result(5)
        assert agent.counters["refused_no_key"] == 2 and agent.counters["direct_sent"] == 0
    finally:
        agent.close()


# -- puts ------------------------------------------------------------------------------------


def _put(hosts, src, dst, tokens, *, tamper=None, seed=None):
    raw = segment_bytes(tokens, S)
    keys = keys_from_bytes(raw, S, SEED)
    toks = [raw[i * S * 8:(i + 1) * S * 8] for i in range(len(keys))]
    if tamper is not None:
        toks[tamper] = segment_bytes([7] * S, S)
    link = hosts[dst].pool
    bufs = [bytes(link.transfers.seg_bytes) for _ in keys]
    header = {"from": src, "keys": keys, "segs": list(range(len(keys))), "tokens": toks}
    if seed is not None:
        header["seed"] = seed
    fut = hosts[src].pool.agent.request(dst, "put", header, bufs)
    hosts[dst].run_held()
    return fut, keys


def test_a_put_whose_key_does_not_match_its_tokens_is_refused():
    net = FakeNet()
    hosts = make_pool(net, ["w0:1", "w1:2"], segment_size=S)
    net.heartbeat()
    tokens = list(range(10, 10 + 3 * S))
    fut, keys = _put(hosts, "w0:1", "w1:2", tokens, tamper=1)
    with pytest.raises(Exception, match="segment 1 does not match"):
        fut.result(5)
    tree = hosts["w1:2"].tree
    assert all(tree.nodes.get(k) is None or tree.nodes[k].value is None for k in keys)
    assert hosts["w1:2"].pool.counters["refused_put_key"] == 1
    fut, _ = _put(hosts, "w0:1", "w1:2", tokens, tamper=0, seed=SEED)  # the root, with its seed
    with pytest.raises(Exception, match="segment 0 does not match"):
        fut.result(5)
    fut, keys = _put(hosts, "w0:1", "w1:2", tokens, seed=SEED)
    assert fut.result(5).header["stored"] == 3
    assert all(tree.nodes[k].value is not None for k in keys)
    hosts["w1:2"].check()


def test_put_key_mismatch_checks_every_parent_link():
    raw = segment_bytes(list(range(3 * S)), S)
    keys = keys_from_bytes(raw, S, SEED)
    toks = [raw[i * S * 8:(i + 1) * S * 8] for i in range(3)]
    assert put_key_mismatch(keys, [0, 1, 2], toks, S, SEED) is None
    assert put_key_mismatch(keys, [0, 1, 2], toks, S) is None  # the root unchecked without seed
    assert put_key_mismatch(keys, [0], toks[:1], S, SEED + 1) == 0
    assert put_key_mismatch(keys, [2], toks[1:2], S) == 2
    assert put_key_mismatch(keys, [0], toks[:1], S, "x") == 0


# -- binding beyond loopback -------------------------------------------------------------------


def test_a_reachable_bind_needs_curve_or_insecure(tmp_path):
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        assert is_loopback(host)
        TokenLakeConfig(host=host)
    for host in ("0.0.0.0", "10.0.0.2", "::", "node7"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="--tokenlake-curve-dir.*--tokenlake-insecure"):
            TokenLakeConfig(host=host)
        TokenLakeConfig(host=host, insecure=True)
        TokenLakeConfig(host=host, curve_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs --tokenlake-curve-dir"):
        TokenLakeConfig(curve_key="w0")


def test_a_worker_puts_its_segments_with_their_seed_so_every_key_is_checked():
    """Puts a worker makes after an insert carry the chain's namespace seed: the home
    checks the first segment's key too (a put without a seed could not be checked there)."""
    net = FakeNet()
    hosts = make_pool(net, ["w0:1", "w1:2"], segment_size=S, placement="segment")  # puts
    net.heartbeat()
    seen = []
    net.dropped = lambda peer, kind, h: seen.append(h) if kind == "put" else False
    hosts["w0:1"].compute(list(range(40, 40 + 8 * S)))
    assert seen and all(h.get("seed") == SEED for h in seen)
    assert hosts["w1:2"].pool.counters["refused_put_key"] == 0
    assert hosts["w1:2"].pool.counters["stored_segments"] == sum(len(h["segs"]) for h in seen)
    hosts["w1:2"].check()
