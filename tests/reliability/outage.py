"""An S3 endpoint that can go down on cue: an HTTP-aware TCP relay on 127.0.0.1 in front of the
local moto server. Clients point ``AWS_ENDPOINT_URL`` at it; ``down_at(pattern)`` takes it down
(listener closed, every open connection cut: clients see resets, then connection refused) the
moment a request line matching ``pattern`` arrives, before that request reaches the server, so a
test can stop "the S3 server" at an exact point of a run. ``up()`` brings it back on the same port
with the server's data intact (moto keeps running behind it)."""

from __future__ import annotations

import re
import socket
import threading
from urllib.parse import urlparse

from fmrilm.local_s3 import free_port


class OutageProxy:
    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.seen: list[str] = []  # request lines forwarded
        self.stopped_at: str | None = None  # the request line that took it down
        self._trigger: tuple[re.Pattern, int] | None = None
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    # ------------------------------------------------------------ control

    def up(self) -> "OutageProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            listener.close()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def down_at(self, pattern: str, nth: int = 1) -> None:
        """Go down when the ``nth`` request line matching ``pattern`` (a regex) arrives."""
        self.stopped_at = None
        self._trigger = (re.compile(pattern), nth)

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    # ------------------------------------------------------------ relay

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self._sockets |= {client, server}
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client), daemon=True).start()

    def _fires(self, line: str) -> bool:
        with self._lock:
            if self._trigger is None or not self._trigger[0].search(line):
                return False
            pattern, left = self._trigger
            self._trigger = (pattern, left - 1) if left > 1 else None
            if left > 1:
                return False
            self.stopped_at = line
            return True

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
                if self._fires(lines[0]):
                    self.down()
                    return
                self.seen.append(lines[0])
                server.sendall(head + b"\r\n\r\n")
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    buf = self._relay_chunked(client, server, buf)
                else:
                    buf = self._relay(client, server, buf, int(headers.get("content-length", "0") or 0))
        except OSError:
            return
        finally:
            self._close(client, server)

    def _relay(self, client, server, buf: bytes, n: int) -> bytes:
        """Forward ``n`` body bytes (``buf`` first); returns what was read past them."""
        if len(buf) >= n:
            server.sendall(buf[:n])
            return buf[n:]
        server.sendall(buf)
        n -= len(buf)
        while n > 0:
            data = self._recv(client, min(1 << 20, n))
            server.sendall(data)
            n -= len(data)
        return b""

    def _relay_chunked(self, client, server, buf: bytes) -> bytes:
        while True:
            while b"\r\n" not in buf:
                buf += self._recv(client)
            line, _, rest = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            server.sendall(line + b"\r\n")
            if size == 0:
                while not rest.startswith(b"\r\n") and b"\r\n\r\n" not in rest:  # trailers
                    rest += self._recv(client)
                end = 2 if rest.startswith(b"\r\n") else rest.index(b"\r\n\r\n") + 4
                server.sendall(rest[:end])
                return rest[end:]
            buf = self._relay(client, server, rest, size + 2)

    @staticmethod
    def _recv(sock, n: int = 65536) -> bytes:
        data = sock.recv(n)
        if not data:
            raise OSError("client closed mid-body")
        return data

    def _responses(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    return
                client.sendall(data)
        except OSError:
            return
        finally:
            self._close(client, server)

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets -= set(socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
