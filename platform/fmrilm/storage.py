"""One storage layer: every location is a URI.

Supported forms:
  * plain paths (``./data``, ``/mnt/x``) and ``file://`` URIs -> the local filesystem;
  * ``s3://bucket/key`` -> pyarrow's S3 filesystem. The endpoint comes from ``AWS_ENDPOINT_URL``
    (or ``AWS_ENDPOINT_URL_S3``; MinIO, moto), the region from ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``; credentials are never passed in code: pyarrow's AWS SDK reads them
    from the environment, the shared config files or the instance/pod role. A bucket can have
    its own options (:func:`configure_bucket`, a dataset card's ``storage:``, or the JSON in
    ``FMRILM_S3_BUCKETS``, which Ray workers inherit): ``anonymous`` (unsigned requests for
    public buckets: no credentials of the environment are ever sent there) and ``endpoint``;
  * ``gs://bucket/key`` -> pyarrow's GCS filesystem (application default credentials).

``resolve(uri)`` returns the ``(pyarrow.fs.FileSystem, path)`` pair that Ray Data, pyarrow and
our writers all share. Writes of small documents (manifests) are atomic: a single PUT on object
stores, write-then-rename locally.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from fmrilm.errors import UserError, embeds_credentials, redact


class StorageError(UserError, RuntimeError):
    """A storage location could not be resolved, read or written."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI it came from."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> "Location":
        """Return the location of ``parts`` below this one."""
        return Location(self.fs, posixpath.join(self.path, *parts), join(self.uri, *parts))


def scheme_of(uri: str) -> str:
    """Return ``"file"``, ``"s3"`` or ``"gs"`` for a URI or plain path. A URI that embeds
    credentials (``s3://KEY:SECRET@bucket``) is refused without echoing them."""
    if embeds_credentials(uri):
        raise StorageError(f"storage URI {redact(uri)} embeds credentials: remove them from the URI; fmrilm reads credentials "
                           "only from the environment, the shared AWS config files or the instance/pod role")
    parsed = urlparse(str(uri))
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # "C:" on Windows
        return "file"
    if parsed.scheme in ("s3", "s3a"):
        return "s3"
    if parsed.scheme in ("gs", "gcs"):
        return "gs"
    raise StorageError(
        f"unsupported storage URI {uri!r}: use a local path, file://, s3:// or gs://"
    )


def is_remote(uri: str) -> bool:
    """True when ``uri`` lives on an object store."""
    return scheme_of(uri) != "file"


def absolute(uri: str) -> str:
    """``uri`` with a relative local path made absolute against this process's working directory
    (Ray workers run elsewhere); remote URIs unchanged."""
    uri = str(uri)
    if scheme_of(uri) != "file":
        return uri
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(uri[len("file://"):]))
    return os.path.abspath(os.path.expanduser(uri))


def is_local_path(value: str) -> bool:
    """Whether a spec string names a local path: no URI scheme and it starts with ``.``, ``/`` or
    ``~`` (or ``file://``), or it names something that exists here. A hub id such as
    ``Qwen/Qwen3-0.6B`` or a built-in name such as ``minilm`` does not."""
    return bool(value) and scheme_of(value) == "file" and (
        value.startswith((".", "/", "~", "file://")) or ("/" in value and os.path.exists(value)))


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI without touching its scheme."""
    uri = str(uri)
    if scheme_of(uri) == "file" and not uri.startswith("file://"):
        return os.path.join(uri, *parts)
    return posixpath.join(uri, *parts)


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, if any (MinIO, moto, a VPC endpoint)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


BUCKETS_ENV = "FMRILM_S3_BUCKETS"


def bucket_options(bucket: str) -> dict:
    """The options of one S3 bucket (``{"anonymous": bool, "endpoint": url}``, either optional)
    from ``FMRILM_S3_BUCKETS``; ``{}`` when it has none."""
    import json

    raw = os.environ.get(BUCKETS_ENV)
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get(bucket) or {})
    except (ValueError, AttributeError):
        raise StorageError(f"{BUCKETS_ENV} is not a JSON object of bucket -> options: fix or unset it") from None


def bucket_endpoint(bucket: str) -> str | None:
    """The S3 endpoint of ``bucket``: its own (:func:`bucket_options`), else the environment's."""
    return bucket_options(bucket).get("endpoint") or s3_endpoint()


def configure_bucket(uri: str, anonymous: bool = False, endpoint: str | None = None) -> None:
    """Give the bucket of the ``s3://`` URI ``uri`` its own options in this process's environment
    (so every Ray worker started from it sees them): ``anonymous`` for unsigned requests (public
    buckets), ``endpoint`` for a bucket on another S3 service. A no-op for other schemes."""
    import json

    if scheme_of(uri) != "s3":
        return
    if endpoint is not None and embeds_credentials(endpoint):
        raise StorageError(f"S3 endpoint {redact(endpoint)} embeds credentials: remove them; they come only from the environment")
    buckets = json.loads(os.environ.get(BUCKETS_ENV) or "{}")
    buckets[urlparse(uri).netloc] = {k: v for k, v in (("anonymous", anonymous), ("endpoint", endpoint)) if v}
    os.environ[BUCKETS_ENV] = json.dumps(buckets, sort_keys=True)


def s3_filesystem(bucket: str | None = None) -> pafs.S3FileSystem:
    """Build pyarrow's S3 filesystem for ``bucket`` from the environment and the bucket's options
    (:func:`bucket_options`; never from explicit credentials)."""
    options = bucket_options(bucket) if bucket else {}
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("FMRILM_S3_MAX_ATTEMPTS", "4"))),
        "connect_timeout": float(os.environ.get("FMRILM_S3_CONNECT_TIMEOUT", "5")),
        "request_timeout": float(os.environ.get("FMRILM_S3_REQUEST_TIMEOUT", "60")),
    }
    endpoint = bucket_endpoint(bucket) if bucket else s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if options.get("anonymous"):
        kwargs["anonymous"] = True  # unsigned: pyarrow then reads no credentials at all
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> Location:
    """Resolve a URI to the filesystem + path pair shared by Ray Data, pyarrow and our writers.

    Takes a plain path, ``file://``, ``s3://`` or ``gs://`` URI; returns a :class:`Location`.
    """
    uri = str(uri)
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri  # file://./runs is relative, as on workers
        path = os.path.abspath(os.path.expanduser(path))
        return Location(pafs.LocalFileSystem(), path, uri)
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"storage URI {uri!r} names no bucket")
    path = f"{parsed.netloc}{parsed.path}".rstrip("/")
    if scheme == "s3":
        return Location(s3_filesystem(parsed.netloc), path, uri)
    return Location(pafs.GcsFileSystem(), path, uri)


UNREACHABLE_SIGNS = ("curlcode: 7", "curlcode: 28", "curlcode: 52", "curlcode: 55", "curlcode: 56", "couldn't connect",
                     "connection refused", "network_connection", "timed out", "connection reset")


def unreachable(err: BaseException) -> bool:
    """Whether a storage error says the object store did not answer (refused, reset, timed out)
    rather than answering with an error (denied, not found). pyarrow raises a generic OSError
    with curl's text for both, so the text is all there is to read."""
    return any(sign in str(err).lower() for sign in UNREACHABLE_SIGNS)


def _missing(loc: Location) -> bool:
    """Whether ``loc`` does not exist, asked of the store (after an error whose type does not say:
    object stores answer a missing key with a generic OSError)."""
    try:
        return loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound
    except OSError:
        return False


def _describe(err: Exception, loc: Location) -> str:
    text = f"{type(err).__name__}: {err}"
    if getattr(err, "errno", None) == 28 or "No space left" in str(err):
        text += " [the disk holding it is full: free space there]"
    if isinstance(loc.fs, pafs.S3FileSystem) and unreachable(err):
        attempts = os.environ.get("FMRILM_S3_MAX_ATTEMPTS", "4")
        text += f" [the object store at {bucket_endpoint(loc.path.split('/', 1)[0]) or 'AWS S3'} is unreachable: no answer after {attempts} attempt(s)]"
    return text


def exists(loc: Location) -> bool:
    """True when a file or directory exists at ``loc``."""
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(f"cannot reach {loc.uri}: {_describe(err, loc)}") from err


def modified_at(loc: Location) -> float:
    """When the file at ``loc`` was last written (epoch seconds; 0 when unknown)."""
    try:
        info = loc.fs.get_file_info(loc.path)
        return info.mtime.timestamp() if info.mtime is not None else 0.0
    except OSError as err:
        raise StorageError(f"cannot reach {loc.uri}: {_describe(err, loc)}") from err


def read_bytes(loc: Location) -> bytes:
    """Read a whole object/file."""
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        if _missing(loc):
            raise FileNotFoundError(loc.uri) from err
        raise StorageError(f"cannot read {loc.uri}: {_describe(err, loc)}") from err


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old object or the new one, never a part."""
    try:
        if isinstance(loc.fs, pafs.LocalFileSystem):
            parent = posixpath.dirname(loc.path)
            loc.fs.create_dir(parent, recursive=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(loc.path)}.{uuid.uuid4().hex}.tmp")
            try:
                with loc.fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, loc.path)
            except OSError:  # a full disk, a lost mount: no half-written temporary file stays behind
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            with loc.fs.open_output_stream(loc.path) as f:  # one PUT: atomic on object stores
                f.write(data)
    except OSError as err:
        raise StorageError(f"cannot write {loc.uri}: {_describe(err, loc)}") from err


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def write_parquet(loc: Location, data, compression: str = "zstd") -> None:
    """Write ``data`` (a pyarrow Table, a pandas DataFrame (index dropped) or a list of row
    dicts) as one parquet file at ``loc``."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(data, list):
        data = pa.Table.from_pylist(data)
    elif not isinstance(data, pa.Table):
        data = pa.Table.from_pandas(data, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(data, buf, compression=compression)
    write_bytes(loc, buf.getvalue())


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create the file at ``loc`` with ``data`` only if nothing is there (one atomic step: a hard
    link of a written temporary file locally, a conditional ``PUT`` with ``If-None-Match: *`` on
    S3); returns False when it already exists.
    On GCS (no conditional create here) it checks, then writes: a narrow race remains."""
    try:
        if isinstance(loc.fs, pafs.LocalFileSystem):
            parent = posixpath.dirname(loc.path)
            loc.fs.create_dir(parent, recursive=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(loc.path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, loc.path)  # atomic and exclusive, with its content: a reader never sees it empty
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if isinstance(loc.fs, pafs.S3FileSystem):
            return _s3_put_if_absent(loc, data)
        if exists(loc):
            return False
        write_bytes(loc, data)
        return True
    except OSError as err:
        raise StorageError(f"cannot write {loc.uri}: {_describe(err, loc)}") from err


def _s3_put_if_absent(loc: Location, data: bytes) -> bool:
    import logging

    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ..." on every commit

    bucket, _, key = loc.path.partition("/")
    endpoint = bucket_endpoint(bucket)  # the same endpoint every other call for this bucket uses
    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                          config=Config(retries={"max_attempts": int(os.environ.get("FMRILM_S3_MAX_ATTEMPTS", "4"))},
                                        connect_timeout=float(os.environ.get("FMRILM_S3_CONNECT_TIMEOUT", "5"))))
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or \
                err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
            return False
        raise StorageError(f"cannot write {loc.uri}: {err}") from err
    except BotoCoreError as err:
        raise StorageError(f"cannot write {loc.uri}: {err} [the object store at {endpoint or 'AWS S3'} is unreachable]") from err


def take_over(loc: Location, stale_id: str, data: bytes) -> bool:
    """Replace the lock file at ``loc``, whose holder ``stale_id`` (unique per holding) is gone, with
    ``data``; returns whether this caller now holds the lock. Of several callers that found the
    same stale holder only the one that creates the marker ``<loc>.takeover-<stale_id>`` first
    deletes the lock, so none of them deletes a lock another has just taken. Markers stay
    (a late caller must still find it) until :func:`drop_takeover_markers`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", stale_id)[:120]
    if not create_exclusive(Location(loc.fs, f"{loc.path}.takeover-{safe}", f"{loc.uri}.takeover-{safe}"), data):
        return False
    delete_file(loc)
    return create_exclusive(loc, data)


def drop_takeover_markers(loc: Location, older_than_s: float = 3600.0) -> None:
    """Remove the takeover markers of the lock at ``loc`` older than ``older_than_s`` (best effort)."""
    import time

    prefix = posixpath.basename(loc.path) + ".takeover-"
    parent = Location(loc.fs, posixpath.dirname(loc.path), loc.uri.rsplit("/", 1)[0])
    try:
        for info in loc.fs.get_file_info(pafs.FileSelector(parent.path, allow_not_found=True)):
            name = posixpath.basename(info.path)
            if name.startswith(prefix) and info.mtime is not None and time.time() - info.mtime.timestamp() > older_than_s:
                delete_file(parent.join(name))
    except (OSError, StorageError):
        pass


def delete_file(loc: Location) -> None:
    """Delete one file; missing is fine."""
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass
    except OSError as err:
        if _missing(loc):
            return
        raise StorageError(f"cannot delete {loc.uri}: {_describe(err, loc)}") from err


def is_dir(loc: Location) -> bool:
    """True when ``loc`` is a directory (a prefix with objects below it on object stores)."""
    try:
        return loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory
    except OSError as err:
        raise StorageError(f"cannot reach {loc.uri}: {_describe(err, loc)}") from err


def makedirs(loc: Location) -> None:
    try:
        loc.fs.create_dir(loc.path, recursive=True)
    except OSError as err:
        raise StorageError(f"cannot create {loc.uri}: {_describe(err, loc)}") from err


def list_dir(loc: Location) -> list[str]:
    """Names (not paths) directly below ``loc``; empty when it does not exist."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"cannot list {loc.uri}: {_describe(err, loc)}") from err
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def delete_dir(loc: Location) -> None:
    """Delete a directory tree (a prefix on object stores); missing is fine."""
    try:
        if loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
            loc.fs.delete_dir(loc.path)
    except OSError as err:
        raise StorageError(f"cannot delete {loc.uri}: {_describe(err, loc)}") from err


def copy_tree(src_uri: str, dst_uri: str) -> int:
    """Copy every file below ``src_uri`` to the same relative paths below ``dst_uri`` (any two
    storages); returns the number of files copied (0 when the source does not exist)."""
    src, dst = resolve(src_uri), resolve(dst_uri)
    try:
        infos = [i for i in src.fs.get_file_info(pafs.FileSelector(src.path, recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File]
    except OSError as err:
        raise StorageError(f"cannot list {src.uri}: {_describe(err, src)}") from err
    for info in infos:
        rel = posixpath.relpath(info.path, src.path)
        write_bytes(dst.join(rel), read_bytes(Location(src.fs, info.path, join(src.uri, rel))))
    return len(infos)
