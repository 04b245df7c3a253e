"""An S3 endpoint on 127.0.0.1 that a test can take down and bring back (an outage).

moto's server sits behind a small TCP proxy. `stop()` cuts every open connection (so clients with pooled
keep-alive connections see the outage too) and from then on drops each new connection unanswered, counting
them in `dropped`: a test can tell that the store really was called during the outage. `start()` forwards
again. moto keeps the objects, like a real endpoint coming back."""

from __future__ import annotations

import contextlib
import socket
import threading

import boto3
from moto.server import ThreadedMotoServer

KEY, SECRET = "AKIAZOOTERFAULTKEY", "zooter-fault-secret-0099"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OutageS3:
    def __init__(self, bucket: str):
        self.backend_port, self.port = _free_port(), _free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.backend_port, verbose=False)
        self.moto.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.options = {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET}
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.start()
        self.client().create_bucket(Bucket=bucket)
        for key in self.keys(bucket):  # moto keeps buckets in process memory: start from an empty one
            self.client().delete_object(Bucket=bucket, Key=key)

    def client(self):
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.backend_port}", aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    # --- the proxy ---------------------------------------------------------------------------------------
    def _serve(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self._listener = lst
        self.up, self.dropped = True, 0
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def start(self) -> None:
        if self._listener is None:
            self._serve()
        self.up = True

    def stop(self) -> None:
        """The outage: every open connection is cut, new ones are dropped."""
        with self._lock:
            self.up = False
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        self.stop()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        self.moto.stop()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            with self._lock:
                if not self.up:
                    self.dropped += 1
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.backend_port))
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
