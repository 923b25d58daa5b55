"""A real S3 API on loopback for tests, benchmarks and the ``--s3`` quickstart: moto's server
in its own process, listening on 127.0.0.1 only.

Usage::

    with LocalS3(bucket="fmrilm") as s3:
        uri = s3.uri("datasets")        # s3://fmrilm/datasets; AWS_ENDPOINT_URL now points here

The context sets ``AWS_ENDPOINT_URL`` and region for this process (and so for a Ray cluster
started inside it) and, only when none are set, placeholder credentials that moto accepts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from fmrilm.errors import UserError
from fmrilm.runtime import free_port


class LocalS3Error(UserError, RuntimeError):
    """The local S3 server could not be started."""


class LocalS3:
    """moto's S3 server as a subprocess on ``127.0.0.1:<port>`` with one bucket."""

    def __init__(self, bucket: str = "fmrilm", port: int | None = None):
        if len(bucket) < 3:
            raise ValueError("S3 bucket names need at least 3 characters")
        self.bucket = bucket
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def start(self) -> "LocalS3":
        """Start the server (and create the bucket); returns self."""
        try:
            import moto.server  # noqa: F401
        except ImportError as err:
            raise LocalS3Error("a local S3 server needs moto[server]: pip install 'fmrilm[dev]'") from err
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LocalS3Error(f"moto server exited with status {self._proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise LocalS3Error(f"moto server did not open 127.0.0.1:{self.port} within 30 s")
        self._set_env()
        self.create_bucket()
        return self

    def _set_env(self) -> None:
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
        if not os.environ.get("AWS_ACCESS_KEY_ID"):
            env |= {"AWS_ACCESS_KEY_ID": "local-s3-placeholder", "AWS_SECRET_ACCESS_KEY": "local-s3-placeholder"}
        for k, v in env.items():
            self._saved.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def create_bucket(self) -> None:
        import pyarrow.fs as pafs

        from fmrilm import storage

        fs = storage.s3_filesystem()
        try:
            fs.create_dir(self.bucket)
        except OSError:
            # pyarrow refuses bucket creation unless allowed; fall back to an explicit request
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                              allow_bucket_creation=True).create_dir(self.bucket)

    def stop(self) -> None:
        """Stop the server (its data is lost) and restore the environment."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved = {}

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
