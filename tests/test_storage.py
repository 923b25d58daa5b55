import os

import pyarrow.fs as pafs
import pytest

from fmrilm import storage


def test_resolve_local_forms(tmp_path):
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        loc = storage.resolve(uri)
        assert isinstance(loc.fs, pafs.LocalFileSystem)
        assert loc.path == str(tmp_path)
    rel = storage.resolve("relative/dir")
    assert rel.path == os.path.abspath("relative/dir")


def test_resolve_s3_uses_environment_endpoint_and_no_explicit_keys(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9999")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    loc = storage.resolve("s3://bucket/a/b")
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.path == "bucket/a/b"
    assert loc.fs.region == "eu-west-1"
    opts = loc.fs.__reduce__()[1][0]
    assert opts["endpoint_override"] == "127.0.0.1:9999" and opts["scheme"] == "http"
    assert opts["access_key"] is None and opts["secret_key"] is None  # never passed in code


def test_resolve_gcs():
    loc = storage.resolve("gs://bucket/a")
    assert isinstance(loc.fs, pafs.GcsFileSystem) and loc.path == "bucket/a"


def test_bad_uris():
    with pytest.raises(storage.StorageError, match="unsupported storage URI"):
        storage.resolve("ftp://host/x")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.resolve("s3:///x")


def test_join_keeps_scheme():
    assert storage.join("s3://b/root", "ds", "manifest.json") == "s3://b/root/ds/manifest.json"
    assert storage.join("/tmp/x", "y") == "/tmp/x/y"


def test_atomic_local_write_and_listing(tmp_path):
    loc = storage.resolve(str(tmp_path)).join("sub", "doc.json")
    storage.write_text(loc, "one")
    storage.write_text(loc, "two")
    assert storage.read_text(loc) == "two"
    assert os.listdir(tmp_path / "sub") == ["doc.json"]  # no temp files left behind
    assert storage.list_dir(storage.resolve(str(tmp_path))) == ["sub"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.resolve(str(tmp_path / "missing")))
    storage.delete_dir(storage.resolve(str(tmp_path / "sub")))
    assert not storage.exists(storage.resolve(str(tmp_path / "sub")))


@pytest.mark.integration
def test_s3_round_trip(local_s3):
    loc = storage.resolve(local_s3.uri("storage-test", "a.txt"))
    storage.write_text(loc, "hello")
    assert storage.read_text(loc) == "hello"
    assert storage.list_dir(storage.resolve(local_s3.uri("storage-test"))) == ["a.txt"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.resolve(local_s3.uri("storage-test", "nope")))
    storage.delete_file(storage.resolve(local_s3.uri("storage-test", "nope")))  # missing is fine
    storage.delete_dir(storage.resolve(local_s3.uri("storage-test")))
    assert storage.list_dir(storage.resolve(local_s3.uri("storage-test"))) == []


def test_an_exclusive_create_uses_the_bucket_s_own_endpoint(local_s3, monkeypatch):
    """A bucket on another S3 service: the commit lock went to the default endpoint but was read at the bucket's."""
    import json

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the default endpoint: nothing listens there
    monkeypatch.setenv(storage.BUCKETS_ENV, json.dumps({"fmrilm-test": {"endpoint": local_s3.endpoint}}))
    loc = storage.resolve(local_s3.uri("own-endpoint", "lock.json"))
    try:
        assert storage.create_exclusive(loc, b"first") is True
        assert storage.create_exclusive(loc, b"second") is False
        assert storage.read_bytes(loc) == b"first"
    finally:
        storage.delete_dir(storage.resolve(local_s3.uri("own-endpoint")))
