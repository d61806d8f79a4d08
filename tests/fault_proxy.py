"""A small TCP proxy on 127.0.0.1 in front of the moto server that misbehaves on purpose.

Faults are real network events for the client (botocore), not hooks inside it:

* ``fail_next(n)``: the next ``n`` connections read the request and answer ``503 Slow
  Down`` (S3's throttling reply), then close: a burst of 5xx;
* ``drop_after(n_bytes)``: the first connection through which ``n_bytes`` of request data
  went is cut there, once: a connection dropped in the middle of an upload.

Every other byte is passed through unchanged, both ways.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress

SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
BODY = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._fail = 0
        self._drop_after: int | None = None
        self.answered_503 = 0
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._fail = n

    def drop_after(self, n_bytes: int) -> None:
        with self._lock:
            self._drop_after = n_bytes

    def close(self) -> None:
        with suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                fail = self._fail > 0
                self._fail -= fail
            target = self._slow_down if fail else self._forward
            threading.Thread(target=target, args=(conn,), daemon=True).start()

    def _slow_down(self, conn: socket.socket) -> None:
        with conn:
            _read_request(conn)
            conn.sendall(SLOW_DOWN % (len(BODY), BODY))
            with self._lock:
                self.answered_503 += 1

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            conn.close()
            return
        threading.Thread(target=_pump, args=(upstream, conn, None), daemon=True).start()
        _pump(conn, upstream, self._cut)

    def _cut(self, sent: int) -> bool:
        """Whether a connection that has sent ``sent`` request bytes is to be cut now (once)."""
        with self._lock:
            if self._drop_after is None or sent <= self._drop_after:
                return False
            self._drop_after = None
            self.dropped += 1
            return True


def _pump(src: socket.socket, dst: socket.socket, cut) -> None:
    sent = 0
    try:
        while data := src.recv(65536):
            if cut is not None and cut(sent + len(data)):
                dst.sendall(data[: len(data) // 2])
                break
            dst.sendall(data)
            sent += len(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _read_request(conn: socket.socket) -> None:
    """Read one request (headers, then a Content-Length or chunked body) so the reply is seen."""
    conn.settimeout(10)
    data = b""
    with suppress(OSError):
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}
        if "content-length" in headers:
            remaining = int(headers["content-length"]) - len(body)
            while remaining > 0 and (chunk := conn.recv(min(65536, remaining))):
                remaining -= len(chunk)
        elif "chunked" in headers.get("transfer-encoding", ""):
            while not body.endswith(b"0\r\n\r\n") and (chunk := conn.recv(65536)):
                body += chunk
