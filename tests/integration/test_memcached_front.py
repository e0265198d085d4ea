"""The memcached front against a real nats-server and a real memcached, driven the way apps drive it.

No drain runs here, so a write that is only journaled never reaches memcached:
unconditional writes are checked in the journal, reads and conditional ops against
keys seeded straight into memcached (and the resolved value they journal).

The front runs in its own thread (its own trio loop, real journal, real listener),
so the tests use blocking clients — pymemcache, raw sockets, memccapable — as apps do.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheServerError

from sidecar import __version__
from sidecar.config import Config, stream_name, validate
from sidecar.envelope import Entry, Op
from sidecar.memcache_keys import EXPIRED, absolute_expiry, entry_key, memcached_key, server_for_key
from sidecar.protocols.memcache import handlers
from sidecar.protocols.memcache.server import serve_memcached
from tests.support.listener import ListenerThread
from tests.support.procs import MemcachedProcess, NatsProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, sidecar_document
from tests.support.streams import read_stream


class Front(ListenerThread):
    """A journal + memcached listener on a trio loop in a thread of its own."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, serve_memcached)

    def client(self, **kwargs: Any) -> Client:
        options: dict[str, Any] = {"connect_timeout": 5, "timeout": 10, "default_noreply": False}
        options.update(kwargs)
        return Client(("127.0.0.1", self.port), **options)

    def socket(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def front_config(nats_url: str, namespace: str, memcached: tuple[str, int] | list[str], **overrides: Any) -> Config:
    servers = memcached if isinstance(memcached, list) else [f"{memcached[0]}:{memcached[1]}"]
    ns = {
        "partitions": 4,
        "targets": [{"name": "cache", "type": "memcached", "servers": servers, "timeout": "1s"}],
        **overrides,
    }
    return validate({
        "sidecar": {"nats_url": nats_url, "admin": f"127.0.0.1:{free_port()}", "shutdown_deadline": "5s",
                    "journal": {"publish_timeout": "1s"}},
        "listeners": [{"protocol": "memcached", "bind": f"127.0.0.1:{free_port()}", "namespace": namespace}],
        "namespaces": {namespace: ns},
    })


@pytest.fixture
def start_front() -> Iterator[Callable[..., Front]]:
    fronts: list[Front] = []

    def start(nats_url: str, namespace: str, memcached: tuple[str, int] | list[str], **overrides: Any) -> Front:
        front = Front(front_config(nats_url, namespace, memcached, **overrides)).start()
        fronts.append(front)
        return front

    yield start
    for front in fronts:
        front.stop()


@pytest.fixture
def front(start_front: Callable[..., Front], services: Services, unique: str) -> Front:
    return start_front(services.nats_url, unique, services.memcached)


@pytest.fixture
def direct(services: Services) -> Iterator[Client]:
    """memcached itself, bypassing the sidecar: to seed keys and to look at what is really there."""
    client = Client(services.memcached, default_noreply=False, connect_timeout=5, timeout=5)
    yield client
    client.close()


def journal(nats_url: str, namespace: str) -> list[Entry]:
    """Every entry of the namespace's stream, in stream order."""
    messages = trio.run(read_stream, nats_url, stream_name(namespace))
    return [m.entry() for m in sorted(messages, key=lambda m: m.seq)]


def by_key(entries: list[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for entry in entries:
        out.setdefault(entry.key, []).append(entry)
    return out


def exchange(sock: socket.socket, request: bytes, until: bytes, timeout: float = 10.0) -> bytes:
    """Send `request`, read until the answer ends with `until`."""
    sock.sendall(request)
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(until):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- unconditional writes


def test_unconditional_writes_are_journaled_with_flags_and_absolute_expiry(front: Front, services: Services,
                                                                           direct: Client, unique: str) -> None:
    client = front.client()
    now = int(time.time())
    assert client.set(f"{unique}-a", b"alpha", expire=0, flags=7) is True
    assert client.set(f"{unique}-ttl", b"short", expire=100) is True
    assert client.set(f"{unique}-abs", b"absolute", expire=now + 40 * 86400) is True
    assert client.set(f"{unique}-gone", b"x", expire=-1) is True  # already expired: journaled as a delete
    assert client.delete(f"{unique}-a") is True  # DELETED without knowing whether it existed
    assert client.delete(f"{unique}-never-existed") is True
    assert client.touch(f"{unique}-ttl", expire=300) is True  # TOUCHED, may not exist in memcached
    # Nothing reached memcached: the drain applies the journal, and none runs here.
    assert direct.get(f"{unique}-ttl") is None
    # ... yet the front reads its own writes (the read-your-writes overlay): the value, a delete's miss.
    assert client.get(f"{unique}-ttl") == b"short"
    assert client.get(f"{unique}-a") is None

    entries = by_key(journal(services.nats_url, unique))
    a = entries[f"{unique}-a"]
    assert [(e.op, e.value, e.flags, e.expires_at) for e in a] == [(Op.PUT, b"alpha", 7, 0), (Op.DELETE, None, 0, 0)]
    ttl = entries[f"{unique}-ttl"]
    assert [e.op for e in ttl] == [Op.PUT, Op.TOUCH]
    assert now + 100 <= ttl[0].expires_at <= now + 102
    assert now + 300 <= ttl[1].expires_at <= now + 302
    assert entries[f"{unique}-abs"][0].expires_at == now + 40 * 86400
    assert [e.op for e in entries[f"{unique}-gone"]] == [Op.DELETE]
    assert [e.op for e in entries[f"{unique}-never-existed"]] == [Op.DELETE]
    for entry in journal(services.nats_url, unique):
        assert entry.ns == unique and entry.origin == "local"
    assert front.ingress is not None  # walcar_writes_total counts them as memcached writes
    counted = {labels: n for labels, n in front.ingress.counters.writes.items() if labels[0] == unique}
    assert counted == {(unique, "memcached", "put", "true"): 3, (unique, "memcached", "delete", "true"): 3,
                       (unique, "memcached", "touch", "true"): 1}


def test_pymemcache_default_noreply_writes_are_journaled_before_the_next_answer(front: Front, services: Services,
                                                                                unique: str) -> None:
    client = front.client(default_noreply=True)  # pymemcache's default: set does not wait for STORED
    for i in range(200):
        assert client.set(f"{unique}-{i}", f"v{i}".encode()) is True
    client.delete(f"{unique}-0")
    # The first answered command on the connection comes after every noreply write before it is journaled.
    assert client.version().startswith(b"walcar-")
    # The journal keeps each key's order (entries of different keys may share a message, in any order).
    entries = by_key(journal(services.nats_url, unique))
    assert sorted(entries) == sorted(f"{unique}-{i}" for i in range(200))
    assert all([e.value for e in entries[f"{unique}-{i}"]] == [f"v{i}".encode()] for i in range(1, 200))
    assert [(e.op, e.value) for e in entries[f"{unique}-0"]] == [(Op.PUT, b"v0"), (Op.DELETE, None)]


def test_large_binary_values_and_key_lengths(front: Front, services: Services, direct: Client, unique: str) -> None:
    client = front.client()
    big = bytes(range(256)) * 4000  # every byte value; fits memcached's 1 MiB item with its overhead
    binary = b"\x00\r\n\xff" * 1000
    key250 = (unique + "k" * 250)[:250]
    assert client.set(f"{unique}-big", big) is True
    assert client.set(f"{unique}-bin", binary) is True
    assert client.set(key250, b"long key") is True
    entries = by_key(journal(services.nats_url, unique))
    assert entries[f"{unique}-bin"][0].value == binary
    assert entries[key250][0].value == b"long key"
    large = entries[f"{unique}-big"][0]  # above the chunk threshold: stored in the chunk store
    assert large.chunk is not None and large.chunk.size == len(big)
    # Reads of large and binary values are relayed from memcached byte for byte (memcached's
    # default item size limit is 1 MiB including its overhead: seed a little less).
    almost = big[:1_000_000]
    direct.set(f"{unique}-seeded-big", almost)
    direct.set(key250, b"seeded")
    assert client.get(f"{unique}-seeded-big") == almost
    assert client.get(key250) == b"long key"  # this sidecar's own write, not yet drained (the overlay)
    with front.socket() as sock:  # pymemcache refuses a 251-byte key itself; the sidecar answers the protocol error
        key251 = (unique + "k" * 251)[:251]
        # As in memcached, the refused set's data line is then read as a command: ERROR.
        assert exchange(sock, b"set %b 0 0 1\r\nx\r\n" % key251.encode(), b"\r\nERROR\r\n") == (
            b"CLIENT_ERROR bad command line format\r\nERROR\r\n")
        assert exchange(sock, b"get %b\r\n" % key251.encode(), b"\r\n").startswith(b"CLIENT_ERROR")
        assert exchange(sock, b"version\r\n", b"\r\n") == b"VERSION walcar-%b\r\n" % __version__.encode()


# --------------------------------------------------------------------------- reads and conditional ops


def test_reads_are_relayed_from_memcached(front: Front, direct: Client, unique: str) -> None:
    client = front.client()
    direct.set(f"{unique}-1", b"one", flags=3)
    direct.set(f"{unique}-2", b"two")
    assert client.get(f"{unique}-1") == b"one"
    assert client.get(f"{unique}-missing") is None
    assert client.get_many([f"{unique}-1", f"{unique}-missing", f"{unique}-2"]) == {
        f"{unique}-1": b"one", f"{unique}-2": b"two"}
    value, cas = client.gets(f"{unique}-1")
    assert value == b"one" and cas == direct.gets(f"{unique}-1")[1]
    with front.socket() as sock:
        assert exchange(sock, f"get {unique}-1\r\n".encode(), b"END\r\n") == (
            f"VALUE {unique}-1 3 3\r\none\r\nEND\r\n".encode())


def test_gat_changes_the_ttl_in_memcached_and_journals_it(front: Front, services: Services, direct: Client,
                                                          unique: str) -> None:
    direct.set(f"{unique}-g", b"gv", expire=100)
    now = int(time.time())
    with front.socket() as sock:
        assert exchange(sock, f"gat 500 {unique}-g {unique}-none\r\n".encode(), b"END\r\n") == (
            f"VALUE {unique}-g 0 2\r\ngv\r\nEND\r\n".encode())  # the miss touches nothing, journals nothing
        assert exchange(sock, f"mg {unique}-g T900 v\r\n".encode(), b"gv\r\n") == b"VA 2\r\ngv\r\n"
    entries = journal(services.nats_url, unique)
    assert [(e.key, e.op) for e in entries] == [(f"{unique}-g", Op.TOUCH)] * 2
    assert now + 500 <= entries[0].expires_at <= now + 502 and now + 900 <= entries[1].expires_at <= now + 902
    with socket.create_connection(services.memcached, timeout=5) as sock:  # memcached's own view of the TTL
        ttl = int(exchange(sock, f"mg {unique}-g t\r\n".encode(), b"\r\n").split(b" t")[1])
    assert 890 <= ttl <= 900


def test_key_and_expiry_mapping() -> None:
    assert entry_key(b"plain") == "plain" and memcached_key("plain") == b"plain"
    assert entry_key("ключ".encode()) == "ключ"
    for raw in (b"\xff\xfe", b"b64:looks-like-a-prefix", b"a\x10b", b"sp ace"):
        assert entry_key(raw).startswith("b64:") and memcached_key(entry_key(raw)) == raw
    now = 1_800_000_000
    assert absolute_expiry(0, now) == 0
    assert absolute_expiry(-1, now) == EXPIRED
    assert absolute_expiry(60, now) == now + 60
    assert absolute_expiry(30 * 86400, now) == now + 30 * 86400  # up to 30 days: relative
    assert absolute_expiry(now + 99, now) == now + 99  # more: an absolute unix time
    assert absolute_expiry(now - 1, now) == EXPIRED


def test_several_servers_route_like_a_pymemcache_hash_client(start_front: Callable[..., Front],
                                                             private_memcached: MemcachedProcess, services: Services,
                                                             unique: str) -> None:
    servers = [f"{services.memcached[0]}:{services.memcached[1]}", f"127.0.0.1:{private_memcached.port}"]
    front = start_front(services.nats_url, unique, servers)
    app = HashClient(servers, default_noreply=False)  # an app talking to the same servers directly
    keys = [f"{unique}-{i}" for i in range(40)]
    for key in keys:
        app.set(key, key.encode())
        assert app.hasher.get_node(key) == server_for_key(servers, key.encode())
    assert {app.hasher.get_node(key) for key in keys} == set(servers)  # both servers hold some
    client = front.client()
    assert client.get_many([*keys, f"{unique}-missing"]) == {key: key.encode() for key in keys}
    assert all(client.get(key) == key.encode() for key in keys[:5])
    app.set(f"{unique}-n", b"1")
    assert client.incr(f"{unique}-n", 2) == 3
    assert app.get(f"{unique}-n") == b"3"
    with front.socket() as sock:  # duplicate keys in one get: memcached answers each, so does the merge
        answer = exchange(sock, f"get {keys[0]} {keys[1]} {keys[0]}\r\n".encode(), b"END\r\n")
    assert answer.count(b"VALUE ") == 3


def test_conditional_ops_run_on_memcached_and_journal_the_resolved_value(front: Front, services: Services,
                                                                         direct: Client, unique: str) -> None:
    client = front.client()
    k = {name: f"{unique}-{name}" for name in ("add", "addx", "rep", "repx", "app", "pre", "inc", "dec", "cas")}
    direct.set(k["addx"], b"exists")
    direct.set(k["rep"], b"old", flags=1, expire=500)
    direct.set(k["app"], b"hello", flags=2)
    direct.set(k["pre"], b"world")
    direct.set(k["inc"], b"41")
    direct.set(k["dec"], b"10")
    direct.set(k["cas"], b"v1")
    now = int(time.time())

    assert client.add(k["add"], b"new", expire=60, flags=5) is True
    assert client.add(k["addx"], b"nope") is False  # NOT_STORED: nothing to journal
    assert client.replace(k["rep"], b"replaced", flags=9) is True
    assert client.replace(k["repx"], b"nope") is False
    assert client.append(k["app"], b" world") is True
    assert client.prepend(k["pre"], b"hello ") is True
    assert client.incr(k["inc"], 1) == 42
    assert client.decr(k["dec"], 3) == 7
    assert client.incr(f"{unique}-nokey", 1) is None  # NOT_FOUND
    _, cas = client.gets(k["cas"])
    assert client.cas(k["cas"], b"v2", cas) is True
    assert client.cas(k["addx"], b"v2", 1) is False  # EXISTS: someone else's cas

    assert direct.get(k["add"]) == b"new" and direct.get(k["app"]) == b"hello world"
    assert direct.get(k["pre"]) == b"hello world" and direct.get(k["inc"]) == b"42"
    assert direct.get(k["cas"]) == b"v2" and direct.get(k["rep"]) == b"replaced"

    entries = by_key(journal(services.nats_url, unique))
    resolved = {name: [(e.op, e.value, e.flags) for e in entries.get(key, [])] for name, key in k.items()}
    assert resolved == {
        "add": [(Op.PUT, b"new", 5)],
        "addx": [],
        "rep": [(Op.PUT, b"replaced", 9)],
        "repx": [],
        "app": [(Op.PUT, b"hello world", 2)],
        "pre": [(Op.PUT, b"hello world", 0)],
        "inc": [(Op.PUT, b"42", 0)],
        "dec": [(Op.PUT, b"7 ", 0)],  # memcached pads a shrunk decr result with spaces: its real value
        "cas": [(Op.PUT, b"v2", 0)],
    }
    assert now + 59 <= entries[k["add"]][0].expires_at <= now + 61  # memcached's remaining TTL, made absolute
    assert entries[k["rep"]][0].expires_at == 0  # replace sets a new exptime (none)
    assert f"{unique}-nokey" not in entries


def test_conditional_op_waits_for_unapplied_writes_then_answers_busy(front: Front, services: Services,
                                                                     direct: Client, unique: str) -> None:
    client = front.client()
    direct.set(f"{unique}-n", b"1")
    assert client.incr(f"{unique}-n", 1) == 2
    # The resolved value is journaled but not yet applied by a drain (none runs): a second
    # conditional op on the key would compute on a value the drain may still overwrite.
    began = time.monotonic()
    with pytest.raises(MemcacheServerError, match="busy"):
        client.incr(f"{unique}-n", 1)
    assert 0.9 <= time.monotonic() - began < 3.0
    assert client.set(f"{unique}-s", b"5") is True  # journaled, not applied
    with pytest.raises(MemcacheServerError, match="busy"):
        client.add(f"{unique}-s", b"6")
    assert client.incr(f"{unique}-other", 1) is None  # other keys are not held up
    assert direct.get(f"{unique}-n") == b"2"
    with front.socket() as sock:
        stats = exchange(sock, b"stats\r\n", b"END\r\n")
    assert b"STAT walcar_conditional_busy 2\r\n" in stats


# --------------------------------------------------------------------------- raw protocol


def test_pipelined_requests_are_answered_and_journaled_in_order(front: Front, services: Services, direct: Client,
                                                                unique: str) -> None:
    direct.set(f"{unique}-seed", b"seeded")
    parts = []
    expected = []
    for i in range(300):
        parts.append(f"set {unique}-{i % 7} 0 0 {len(str(i))}\r\n{i}\r\n".encode())
        expected.append(b"STORED\r\n")
        if i % 50 == 0:
            parts.append(f"get {unique}-seed\r\n".encode())
            expected.append(b"VALUE %b-seed 0 6\r\nseeded\r\nEND\r\n" % unique.encode())
        if i % 60 == 0:
            parts.append(f"set {unique}-q 0 0 1 noreply\r\n{i % 10}\r\n".encode())
    parts.append(b"mn\r\n")
    expected.append(b"MN\r\n")
    with front.socket() as sock:
        assert exchange(sock, b"".join(parts), b"MN\r\n") == b"".join(expected)
    entries = by_key(journal(services.nats_url, unique))  # in order per key, the journal's promise
    assert all([e.value for e in entries[f"{unique}-{k}"]] == [str(i).encode() for i in range(k, 300, 7)]
               for k in range(7))
    assert [e.value for e in entries[f"{unique}-q"]] == [b"0", b"0", b"0", b"0", b"0"]


def test_many_connections_one_request_at_a_time_each_get_their_own_answers(front: Front, services: Services,
                                                                          direct: Client, unique: str) -> None:
    """The listener's multiplexer serves such clients from one task (mux.py): every answer reaches the
    socket that asked, in order, and a connection moved to its own task mid-way (by a get) goes on."""
    socks = [front.socket() for _ in range(20)]
    direct.set(f"{unique}-seed", b"seeded")
    try:
        for round_ in range(25):
            for index, sock in enumerate(socks):
                value = b"%d.%d" % (index, round_)
                sock.sendall(b"set %b-%d 0 0 %d\r\n%b\r\n" % (unique.encode(), index, len(value), value))
            for sock in socks:
                assert exchange(sock, b"", b"\r\n") == b"STORED\r\n"
            if round_ == 10:  # every other connection leaves the multiplexer for its own task
                for sock in socks[::2]:
                    assert exchange(sock, f"get {unique}-seed\r\n".encode(), b"END\r\n") == (
                        b"VALUE %b-seed 0 6\r\nseeded\r\nEND\r\n" % unique.encode())
    finally:
        for sock in socks:
            sock.close()
    entries = by_key(journal(services.nats_url, unique))
    for index in range(20):
        assert [e.value for e in entries[f"{unique}-{index}"]] == [b"%d.%d" % (index, r) for r in range(25)]


def test_a_long_noreply_stream_keeps_flowing(front: Front, services: Services, unique: str) -> None:
    """More noreply writes in one burst than a connection may owe answers for: nothing stalls."""
    request = b"".join(b"set %b-%d 0 0 1 noreply\r\nx\r\n" % (unique.encode(), i) for i in range(10_000))
    with front.socket() as sock:
        assert exchange(sock, request + b"mn\r\n", b"MN\r\n", timeout=30) == b"MN\r\n"
    assert len(journal(services.nats_url, unique)) == 10_000


def test_meta_commands_with_opaque_quiet_mode_and_base64_keys(front: Front, services: Services, direct: Client,
                                                              unique: str) -> None:
    binary_key = b"\xffbin\x01" + unique.encode()
    b64 = base64.b64encode(binary_key)
    text_as_b64 = base64.b64encode(f"{unique}-text".encode())
    direct.set(f"{unique}-hit", b"hit!", flags=4)
    direct.set(f"{unique}-num", b"10")
    request = b"".join([
        b"ms %b 3 b T60 F6 O11 k\r\nbin\r\n" % b64,  # binary key: journaled as b64:<base64>
        b"ms %b 2 b q\r\nhi\r\n" % text_as_b64,  # quiet success: no answer
        f"md {unique}-del q O12\r\n".encode(),  # quiet: HD hidden
        f"mg {unique}-hit v f O13 k\r\n".encode(),
        f"mg {unique}-miss v q O14\r\n".encode(),  # quiet miss: hidden
        f"mg {unique}-miss v O15\r\n".encode(),
        f"ma {unique}-num D5 v O16\r\n".encode(),
        f"ms {unique}-add 1 ME O17\r\nz\r\n".encode(),  # add mode: synchronous, on memcached
        b"mn\r\n",
    ])
    with front.socket() as sock:
        answer = exchange(sock, request, b"MN\r\n")
    assert answer == b"".join([
        b"HD O11 k%b b\r\n" % b64,
        f"VA 4 f4 O13 k{unique}-hit\r\nhit!\r\n".encode(),
        b"EN O15\r\n",
        b"VA 2 O16\r\n15\r\n",
        b"HD O17\r\n",
        b"MN\r\n",
    ])
    assert direct.get(f"{unique}-num") == b"15" and direct.get(f"{unique}-add") == b"z"
    now = int(time.time())
    entries = by_key(journal(services.nats_url, unique))
    binary = entries["b64:" + b64.decode()]
    assert [(e.op, e.value, e.flags) for e in binary] == [(Op.PUT, b"bin", 6)]
    assert now + 58 <= binary[0].expires_at <= now + 61
    assert [(e.op, e.value) for e in entries[f"{unique}-text"]] == [(Op.PUT, b"hi")]  # same key as the text form
    assert [e.op for e in entries[f"{unique}-del"]] == [Op.DELETE]
    assert [(e.op, e.value) for e in entries[f"{unique}-num"]] == [(Op.PUT, b"15")]
    assert [(e.op, e.value) for e in entries[f"{unique}-add"]] == [(Op.PUT, b"z")]


def test_keys_with_control_characters_work_as_in_memcached(front: Front, services: Services, direct: Client,
                                                          unique: str) -> None:
    key = b"\x10\x10" + unique.encode() + b"\x7f"  # memaslap's keys look like this; memcached takes them
    direct.set(key + b"seeded", b"v")
    with front.socket() as sock:
        assert exchange(sock, b"set %b 0 0 1\r\nx\r\n" % key, b"\r\n") == b"STORED\r\n"
        assert exchange(sock, b"get %bseeded\r\n" % key, b"END\r\n") == b"VALUE %bseeded 0 1\r\nv\r\nEND\r\n" % key
        assert exchange(sock, b"get a\tb\r\n", b"\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    [entry] = journal(services.nats_url, unique)
    assert entry.key == "b64:" + base64.b64encode(key).decode() and entry.value == b"x"


def test_malformed_input_answers_the_protocol_error(front: Front) -> None:
    with front.socket() as sock:
        assert exchange(sock, b"bogus\r\n", b"\r\n") == b"ERROR\r\n"
        assert exchange(sock, b"set k 0 0 notanumber\r\n", b"\r\n") == b"CLIENT_ERROR bad command line format\r\n"
        assert exchange(sock, b"incr k abc\r\n", b"\r\n") == b"CLIENT_ERROR invalid numeric delta argument\r\n"
        assert exchange(sock, b"version\r\n", b"\r\n").startswith(b"VERSION ")  # the connection survived
        # A data block longer than announced cannot be resynchronised: error, then close.
        assert exchange(sock, b"set k 0 0 1\r\ntoolong\r\n", b"\r\n") == b"CLIENT_ERROR bad data chunk\r\n"
        sock.settimeout(5)
        assert sock.recv(100) == b""


def test_stats_version_verbosity_flush_all(front: Front, services: Services, direct: Client, unique: str) -> None:
    client = front.client()
    assert client.set(f"{unique}-s", b"x") is True
    stats = client.stats()
    assert b"pid" in stats and b"curr_items" in stats  # memcached's own fields, relayed
    assert stats[b"walcar_journal_acked"] >= 1 and stats[b"walcar_writes_stored"] == 1
    assert stats[b"walcar_memcached_up"] == 1 and stats[b"walcar_journal_inflight"] == 0
    assert client.version() == b"walcar-" + __version__.encode()
    with front.socket() as sock:
        assert exchange(sock, b"verbosity 1\r\n", b"\r\n") == b"OK\r\n"
        assert exchange(sock, b"stats slabs\r\n", b"END\r\n").endswith(b"END\r\n")
    before = len(journal(services.nats_url, unique))
    direct.set(f"{unique}-f", b"flush me")
    assert client.flush_all() is True  # forwarded to memcached, not journaled
    assert direct.get(f"{unique}-f") is None
    assert len(journal(services.nats_url, unique)) == before


# --------------------------------------------------------------------------- outages


def test_journal_down_never_answers_stored(start_front: Callable[..., Front], private_nats: NatsProcess,
                                           services: Services, unique: str) -> None:
    front = start_front(private_nats.url, unique, services.memcached)
    client = front.client()
    assert client.set(f"{unique}-before", b"ok") is True
    private_nats.stop()
    answers = []
    for i in range(20):
        try:
            answers.append(client.set(f"{unique}-{i}", b"v"))
        except MemcacheServerError as exc:
            answers.append(str(exc))
    assert all(isinstance(a, str) and "not journaled" in a for a in answers), answers
    with front.socket() as sock:
        assert exchange(sock, b"ms k 1\r\nx\r\n", b"\r\n").startswith(b"SERVER_ERROR not journaled")
        assert exchange(sock, b"delete k\r\n", b"\r\n").startswith(b"SERVER_ERROR")
        sock.sendall(b"set k 0 0 1 noreply\r\nx\r\n")  # fails silently, as memcached would; counted
        stats = exchange(sock, b"stats\r\n", b"END\r\n")
    assert b"STAT walcar_noreply_failed 1\r\n" in stats
    assert b"STAT walcar_writes_stored 1\r\n" in stats


def test_memcached_down_reads_fail_writes_still_journaled(start_front: Callable[..., Front],
                                                          private_memcached: MemcachedProcess, services: Services,
                                                          unique: str) -> None:
    front = start_front(services.nats_url, unique, ("127.0.0.1", private_memcached.port))
    client = front.client()
    seed = Client(("127.0.0.1", private_memcached.port), default_noreply=False)
    seed.set(f"{unique}-n", b"1")
    assert client.get(f"{unique}-n") == b"1"
    private_memcached.stop()
    with pytest.raises(MemcacheServerError, match="memcached"):
        client.get(f"{unique}-n")
    with pytest.raises(MemcacheServerError, match="memcached"):
        client.get_many([f"{unique}-n", f"{unique}-m"])
    with pytest.raises(MemcacheServerError, match="memcached"):
        client.incr(f"{unique}-n", 1)
    with pytest.raises(MemcacheServerError, match="memcached"):
        client.add(f"{unique}-a", b"x")
    with pytest.raises(MemcacheServerError, match="memcached"):
        client.flush_all()
    for i in range(50):
        assert client.set(f"{unique}-{i}", f"v{i}".encode()) is True  # journaled: the drain applies it later
    assert client.delete(f"{unique}-n") is True
    assert client.stats()[b"walcar_memcached_up"] == 0
    entries = journal(services.nats_url, unique)
    assert len([e for e in entries if e.op is Op.PUT]) == 50
    private_memcached.start()
    deadline = time.monotonic() + 5
    while True:  # the pool reconnects by itself
        try:
            assert client.get(f"{unique}-n") is None  # a fresh memcached: empty
            break
        except MemcacheServerError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_memcached_that_does_not_answer_times_out(start_front: Callable[..., Front], services: Services,
                                                  unique: str) -> None:
    with socket.socket() as black_hole:  # accepts connections (kernel backlog), never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        front = start_front(services.nats_url, unique, ("127.0.0.1", black_hole.getsockname()[1]))
        client = front.client()
        began = time.monotonic()
        with pytest.raises(MemcacheServerError, match="did not answer within 1s"):
            client.get(f"{unique}-k")
        assert 0.9 < time.monotonic() - began < 2.5
        assert client.set(f"{unique}-k", b"v") is True  # writes do not need memcached


def test_stop_answers_in_flight_commands_then_closes(start_front: Callable[..., Front], services: Services,
                                                     unique: str) -> None:
    front = start_front(services.nats_url, unique, services.memcached)
    sock = front.socket()
    request = b"".join(f"set {unique}-{i} 0 0 1\r\nx\r\n".encode() for i in range(200))
    sock.sendall(request)
    assert sock.recv(8) == b"STORED\r\n"  # the connection is being served
    front.stop()
    data = b"STORED\r\n"
    sock.settimeout(10)
    while chunk := sock.recv(1 << 16):
        data += chunk
    sock.close()
    assert data == b"STORED\r\n" * 200
    assert len(journal(services.nats_url, unique)) == 200


# --------------------------------------------------------------------------- memccapable

MEMCCAPABLE = "/usr/bin/memccapable"

# The one ASCII test that fails by design, drain or not.
DIFFERS_BY_DESIGN = {
    "ascii delete": "expects NOT_FOUND when deleting a deleted key; an unconditional delete is journaled and "
                    "always answered DELETED (whether the key exists is not known without memcached)",
}
# Without a drain, nothing journaled reaches memcached: these run a conditional op right after a
# write of the same key (-> busy), or read back what one did. (get, gets, mget, cas noreply and
# replace noreply pass: plain reads of the front's own writes come from the read-your-writes overlay.)
NEEDS_A_DRAIN = {
    "ascii flush": "reads back a key it just set before flushing",
    "ascii flush noreply": "reads back a key it just set before flushing",
    "ascii add": "second add of a key: the first add's journaled result is not applied -> busy",
    "ascii replace": "replace right after a set of the key: the set is not applied -> busy",
    "ascii cas": "gets right after a set of the key",
    "ascii incr": "incr right after a set of the key: the set is not applied -> busy",
    "ascii incr noreply": "reads back the counter",
    "ascii decr": "decr right after a set of the key: the set is not applied -> busy",
    "ascii decr noreply": "reads back the counter",
    "ascii append": "append right after a set of the key: the set is not applied -> busy",
    "ascii append noreply": "reads back the appended value",
    "ascii prepend": "prepend right after a set of the key: the set is not applied -> busy",
    "ascii prepend noreply": "reads back the prepended value",
}
ALL_ASCII = {"ascii version", "ascii quit", "ascii verbosity", "ascii set", "ascii set noreply", "ascii stat",
             "ascii add noreply", "ascii delete noreply", "ascii get", "ascii gets", "ascii mget", "ascii cas noreply",
             "ascii replace noreply"} | set(NEEDS_A_DRAIN) | set(DIFFERS_BY_DESIGN)


def memccapable(port: int) -> dict[str, str]:
    """Run `memccapable -a` (ASCII tests only); test name -> pass / FAIL / skip."""
    proc = subprocess.run([MEMCCAPABLE, "-h", "127.0.0.1", "-p", str(port), "-a", "-t", "5"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    # "<name>  <padding>[pass]", or "<name>  [<the unexpected answer>]\n[FAIL]" for a failure.
    results = dict(re.findall(r"(ascii [a-z ]+?) {2,}.*?\[(pass|FAIL|skip)\]", proc.stdout, re.S))
    assert set(results) == ALL_ASCII, proc.stdout
    return results


needs_memccapable = pytest.mark.skipif(not os.path.exists(MEMCCAPABLE),
                                       reason="memccapable (Debian libmemcached-tools) is not installed")


@needs_memccapable
def test_memccapable_without_a_drain(start_front: Callable[..., Front], private_memcached: MemcachedProcess,
                                     services: Services, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "BUSY_WAIT", 0.05)  # the busy answers are expected: do not wait 1 s for each
    # memccapable flushes the server it tests: give it a memcached of its own.
    front = start_front(services.nats_url, unique, ("127.0.0.1", private_memcached.port))
    results = memccapable(front.port)
    failed = {name for name, result in results.items() if result != "pass"}
    assert failed == set(NEEDS_A_DRAIN) | set(DIFFERS_BY_DESIGN), results


@needs_memccapable
def test_memccapable_with_the_drain_in_sync_mode(private_memcached: MemcachedProcess, private_nats: NatsProcess,
                                                 unique: str, tmp_path: Path) -> None:
    """A real `walcar run` (ingress and drain): a sync namespace answers STORED once memcached has the
    write, so every ASCII test passes but the one that differs by design.

    A nats-server of its own: drainers share partitions with every drainer on the same server
    (whatever namespaces those drain), so other sidecars on a shared one would take shares."""
    listener = {"protocol": "memcached", "bind": f"127.0.0.1:{free_port()}", "namespace": unique}
    servers = [f"127.0.0.1:{private_memcached.port}"]
    namespace = {"mode": "sync", "visibility_budget": "2s", "partitions": 4,
                 "targets": [{"name": "cache", "type": "memcached", "servers": servers}]}
    walcar = SidecarProcess(sidecar_document(private_nats.url, {unique: namespace}, [listener]), tmp_path / "walcar")
    walcar.start()
    try:
        results = memccapable(int(listener["bind"].rsplit(":", 1)[1]))
    finally:
        walcar.stop()
    failed = {name for name, result in results.items() if result != "pass"}
    assert failed == set(DIFFERS_BY_DESIGN), (results, walcar.log()[-3000:])


# --------------------------------------------------------------------------- outage, end to end


def test_memcached_outage_writes_survive_and_land_when_it_is_back(private_memcached: MemcachedProcess,
                                                                  private_nats: NatsProcess, unique: str,
                                                                  tmp_path: Path) -> None:
    """A real `walcar run` (ingress and drain): memcached down while 50k writes go through the sidecar;
    every one is STORED, reads fail; memcached back: all 50k land with their flags, TTLs not extended.
    (A nats-server of its own, for the same reason as the memccapable test with the drain.)"""
    listener = {"protocol": "memcached", "bind": f"127.0.0.1:{free_port()}", "namespace": unique}
    namespace = {"partitions": 8,
                 "targets": [{"name": "cache", "type": "memcached", "servers": [f"127.0.0.1:{private_memcached.port}"],
                              "timeout": "1s"}]}
    walcar = SidecarProcess(sidecar_document(private_nats.url, {unique: namespace}, [listener]), tmp_path / "walcar")
    walcar.start()
    port = int(listener["bind"].rsplit(":", 1)[1])
    client = Client(("127.0.0.1", port), default_noreply=False, timeout=30)
    try:
        private_memcached.stop()
        written_at = int(time.time())
        keys = [f"{unique}-{i}" for i in range(50_000)]
        for start in range(0, len(keys), 1000):
            batch = {key: f"value-{key}".encode() for key in keys[start:start + 1000]}
            flags = start // 1000  # per batch; pymemcache set_many pipelines the batch
            expire = 600 if start % 2000 == 0 else 0
            assert client.set_many(batch, expire=expire, flags=flags) == []  # [] = nothing failed: all STORED
        # This sidecar's own writes read back while memcached is down (the overlay holds the newest
        # ones within its default budget); a key it never wrote needs memcached.
        assert client.get(keys[-1]) == f"value-{keys[-1]}".encode()
        with pytest.raises(MemcacheServerError, match="memcached"):
            client.get(f"{unique}-never-written")
        private_memcached.start()
        direct = Client(("127.0.0.1", private_memcached.port), default_noreply=False, timeout=10)
        deadline = time.monotonic() + 45
        while True:
            found = sum(len(direct.get_many(keys[i:i + 1000])) for i in range(0, len(keys), 1000))
            if found == len(keys):
                break
            assert time.monotonic() < deadline, f"only {found} of {len(keys)} keys landed"
            time.sleep(0.5)
        for start in range(0, len(keys), 1000):
            got = direct.get_many(keys[start:start + 10])
            assert got == {key: f"value-{key}".encode() for key in keys[start:start + 10]}
        with socket.create_connection(("127.0.0.1", private_memcached.port), timeout=5) as sock:
            for start, expected_ttl in ((0, 600), (1000, -1)):
                line = exchange(sock, f"mg {keys[start]} f t\r\n".encode(), b"\r\n")
                flags = int(line.split(b" f")[1].split()[0])
                ttl = int(line.split(b" t")[1].split()[0])
                assert flags == start // 1000
                if expected_ttl < 0:
                    assert ttl == -1
                else:  # the absolute expiry from ingress: what is left of 600 s, never a fresh 600
                    assert ttl <= 600 - (int(time.time()) - written_at) + 1
        assert client.get(keys[1]) == f"value-{keys[1]}".encode()  # and reads through the sidecar work again
    finally:
        client.close()
        walcar.stop()
