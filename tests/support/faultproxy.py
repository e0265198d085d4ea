"""A TCP proxy between the sidecar and a real server, for network faults on demand.

It runs in its own thread so tests of any flavour (trio, sync) can drive it:
    proxy = FaultProxy(("127.0.0.1", nats_port)).start()
    proxy.cut_after(40_000)   # forward 40 kB more towards the server, then sever every connection
    proxy.sever()             # drop every connection now
    proxy.refuse = True       # refuse new connections (server "down" behind a live port)
    proxy.stall_replies.set() # hold everything the server sends until cleared (a hung server)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.refuse = False
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._budget: int | None = None  # bytes towards the server before severing
        self.severed = threading.Event()
        self.stall_replies = threading.Event()
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes
            self.severed.clear()

    def sever(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        # Set before the sockets go: the client sees the cut at once and may answer (and a test
        # check `severed`) before this thread would get to run again.
        self.severed.set()
        for client, server in pairs:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._closed = True
        self.sever()
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, towards_server: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            while not towards_server and self.stall_replies.is_set() and not self._closed:
                time.sleep(0.01)
            cut = False
            if towards_server:
                with self._lock:
                    if self._budget is not None:
                        if len(data) >= self._budget:
                            data = data[: self._budget]
                            cut = True
                            self._budget = None
                        else:
                            self._budget -= len(data)
            try:
                if data:
                    sink.sendall(data)
            except OSError:
                break
            if cut:
                self.sever()
                return
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
