"""Shared pieces of the fault tests: a fault-injecting S3 proxy, manifests, result checks, process helpers."""

from __future__ import annotations

import http.client
import io
import os
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd

# Distinctive fake credentials: moto accepts anything, and the secrets test greps every output for them.
ACCESS_KEY = "AKIAFAULTTEST7QX2ZP4M"
SECRET_KEY = "fAuLt+SeCrEt/wJ9xQ2vT7uZ3kLmN8pR4sY6bC1d"
GEN = dict(num_frames=9, height=32, width=32, steps=2, guidance_scale=6.0)
FINAL_STATES = {"ok", "failed", "skipped"}
BUCKET = "faults"

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")
_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                  b"<Message>Access Denied</Message></Error>")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultProxy:
    """An HTTP proxy in front of the moto S3 server that injects faults.

    - outages: while ``time.time() < outage_until`` every request fails, alternately with ``503 SlowDown`` and
      with the connection dropped before any response (both what a real S3 endpoint does under trouble);
    - triggers: ``(method, path substring, seconds)``; the first matching request starts an outage of that length
      (and fails), so a test can make sure an outage hits a read or a write of the job itself;
    - denied: ``(method, path substring)``; every matching request gets ``403 AccessDenied`` (a permanent failure).
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.outage_until = 0.0
        self.triggers: list[tuple[str, str, float]] = []
        self.denied: list[tuple[str, str]] = []
        self.fired: list[str] = []  # "METHOD path" of each request that started an outage
        self.faulted = 0  # requests failed by an outage
        self.denials = 0
        self.after_outage = 0  # requests served after an outage ended
        self.puts: Counter[str] = Counter()  # path -> uploads that reached the server
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                body = self._body()
                fault = proxy._decide(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    return self._reply(503, _SLOW_DOWN)
                if fault == "403":
                    return self._reply(403, _ACCESS_DENIED)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length", "expect")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if self.command == "PUT" and resp.status == 200:
                        with proxy._lock:
                            proxy.puts[self.path.split("?")[0]] += 1
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                            self.send_header(k, v)
                    # HEAD keeps the object's length; other answers carry exactly the bytes read
                    length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            for m, part in self.denied:
                if method == m and part in path:
                    self.denials += 1
                    return "403"
            now = time.time()
            for i, (m, part, seconds) in enumerate(self.triggers):
                if method == m and part in path:
                    del self.triggers[i]
                    self.fired.append(f"{method} {path}")
                    self.outage_until = max(self.outage_until, now + seconds)
                    break
            if now < self.outage_until:
                self.faulted += 1
                return "drop" if self.faulted % 2 else "503"
            if self.faulted:
                self.after_outage += 1
            return None

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.outage_until, self.triggers, self.denied, self.fired = 0.0, [], [], []
            self.faulted = self.denials = self.after_outage = 0
            self.puts.clear()


def job_config(backbone, checkpoint, output, **kw):
    from pipelines.config import BatchJobConfig
    from video2lora.config import GenerationConfig

    kw = {"batch_size": 2, "actor_num_cpus": 0.25, "decode_num_cpus": 0.25, **kw}
    return BatchJobConfig(backbone=backbone, checkpoint=checkpoint, output=str(output), generation=GenerationConfig(**GEN), **kw)


def write_manifest(path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes its columns from row 0 only
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), str(path))
    return str(path)


def results_table(output: str) -> pd.DataFrame:
    from video2lora.storage import join, read_bytes

    return pd.read_parquet(io.BytesIO(read_bytes(join(output, "results.parquet"))))


def check_final_states(table: pd.DataFrame, sample_ids) -> pd.DataFrame:
    """Every manifest row is in the results exactly once, in a final state, with a reason unless ok."""
    assert sorted(table.sample_id) == sorted(sample_ids), "a row is missing from the results or appears twice"
    assert set(table.status) <= FINAL_STATES, set(table.status)
    not_ok = table[table.status != "ok"]
    assert (not_ok.error.fillna("").str.len() > 0).all(), not_ok[["sample_id", "status", "error"]]
    return table.set_index("sample_id")


def partial_files(root) -> list[str]:
    """Temporary files of interrupted writes under ``root`` (write_bytes_atomic names them ``.NAME.XXXX.tmp``)."""
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.endswith(".tmp") or ".partial" in f]
    return out
