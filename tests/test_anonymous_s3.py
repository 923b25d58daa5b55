"""Public buckets: a card with ``storage: {anonymous: true, endpoint: ...}`` is ingested from the
local S3 server with unsigned requests only, through the card's own endpoint, while credentials
sit in the environment (a recording proxy on loopback sees every request)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
from urllib.parse import urlparse

import pytest
import yaml

from fmrilm import storage
from fmrilm.data.ingest import ingest_card
from tests.test_ingest import make_cohort


class RecordingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to ``target`` (host:port) and records its method, path and whether it was signed."""

    def __init__(self, target: str):
        self.target, self.seen = target, []
        super().__init__(("127.0.0.1", 0), ProxyHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, "Authorization" in self.headers or "X-Amz-Security-Token" in self.headers))
        conn = http.client.HTTPConnection(self.server.target, timeout=10)
        conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def _upload(local_root, prefix: str) -> None:
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_root).replace(os.sep, "/")
            storage.write_bytes(storage.resolve(f"{prefix}/{rel}"), open(path, "rb").read())


@pytest.fixture
def proxy(local_s3):
    server = RecordingProxy(urlparse(local_s3.endpoint).netloc)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_a_public_bucket_is_read_unsigned_through_the_cards_endpoint(tmp_path, local_s3, proxy, monkeypatch):
    monkeypatch.setenv(storage.BUCKETS_ENV, "{}")  # restored after the test
    src = tmp_path / "src"
    src.mkdir()
    card = yaml.safe_load(open(make_cohort(src)))
    prefix = local_s3.uri("public-cohort")
    _upload(src, prefix)  # signed, with the environment's credentials
    assert os.environ.get("AWS_ACCESS_KEY_ID")  # credentials are present, and must not be sent below
    card |= {"root": f"{prefix}/derivatives", "storage": {"anonymous": True, "endpoint": proxy.endpoint}}
    card["phenotypes"]["file"] = f"{prefix}/participants.tsv"
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump(card))

    result = ingest_card(str(path), str(tmp_path / "store"), use_ray=False)
    assert result.written and result.manifest["rows"] == 4
    assert any(method == "GET" for method, _, _ in proxy.seen)  # the card's endpoint carried the reads
    assert [r for r in proxy.seen if r[2]] == []  # none of them signed
    assert json.loads(os.environ[storage.BUCKETS_ENV]) == {local_s3.bucket: {"anonymous": True, "endpoint": proxy.endpoint}}


def test_bucket_options_refuse_endpoints_with_credentials_and_bad_json(monkeypatch):
    monkeypatch.setenv(storage.BUCKETS_ENV, "{}")
    with pytest.raises(storage.StorageError, match=r"embeds credentials") as err:
        storage.configure_bucket("s3://b/x", endpoint="http://KEY:SECRET@127.0.0.1:9")
    assert "SECRET" not in str(err.value)
    storage.configure_bucket("s3://pub/x", anonymous=True)
    opts = storage.resolve("s3://pub/a").fs.__reduce__()[1][0]
    assert opts["anonymous"] is True and storage.resolve("s3://other/a").fs.__reduce__()[1][0]["anonymous"] is False
    monkeypatch.setenv(storage.BUCKETS_ENV, "not json")
    with pytest.raises(storage.StorageError, match="FMRILM_S3_BUCKETS is not a JSON object"):
        storage.resolve("s3://pub/a")
