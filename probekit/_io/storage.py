"""Where a run directory's files live: a local (or shared, mounted) folder, or an S3 prefix.

Why: a run directory is written by one run at a time and read by anyone, and on a cluster the
node that writes it may not share a disk with the one that reads it. A local folder keeps the
rename protocol of :mod:`probekit._io.atomic` (write a temporary file, rename it over the name).
An object store has no rename, so this module uses the store's **conditional writes**, which S3
has offered since 2024 (and MinIO, Ceph RGW, moto):

- ``create``: ``PutObject`` with ``If-None-Match: *`` writes an object only if none is there
  (412 Precondition Failed otherwise): how a lock is taken.
- ``swap``: ``PutObject`` with ``If-Match: <ETag>`` replaces an object only if it is still the
  version read (compare-and-swap): how a lock's heartbeat and a taken-over lock are written, and
  how ``run.json``, the record that commits a run, is replaced only over the version the run
  itself last wrote.
- Everything else is a plain ``PutObject`` of a whole object: S3 never shows a half-written object,
  so a single object is atomic by itself. Files that go together commit by a marker written last
  (a part's seal, run.json's manifest), as in the local protocol.

Addresses: a local path (or ``file://`` URI) is a :class:`LocalStorage`; ``s3://bucket/prefix`` is an
:class:`S3Storage` (``pip install 'probekit[s3]'`` installs boto3). Credentials, region and endpoint
come from boto3's standard sources: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a profile,
``AWS_PROFILE``), ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an
S3-compatible server (MinIO, Ceph, a local moto server). Other schemes are refused with a one-line
error: a store without conditional writes cannot hold a lock safely.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from probekit._io.atomic import atomic_path, write_errors
from probekit.errors import ConfigError, WriteError

__all__ = ["Storage", "LocalStorage", "S3Storage", "storage_for", "is_uri"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: C:\ is a Windows drive


def is_uri(where: Any) -> bool:
    """Whether ``where`` is a URI of a remote store (``s3://...``), not a local path (``file://`` is local)."""
    m = _SCHEME.match(str(where)) if isinstance(where, str) else None
    return m is not None and m.group(1).lower() != "file"


_PIECE = 1 << 20


def _join(*names: str) -> str:
    return "/".join(n.strip("/") for n in names if n.strip("/"))


class Storage:
    """The files under one root, by names relative to it (``/``-separated).

    ``tag``: what identifies one version of a file, for :meth:`swap` (an ETag on S3, the SHA-256
    of the content locally).
    """

    location: str  # the root as a user gives it (a path or a URI), for messages

    def child(self, name: str) -> Storage:
        raise NotImplementedError

    def uri(self, name: str = "") -> str:
        """The address of ``name`` (for messages and links)."""
        return _join(self.location, name) if name else self.location

    def read(self, name: str) -> bytes:
        """The content of ``name``. Raises FileNotFoundError when there is none."""
        return self.read_tagged(name)[0]

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> str:
        """Write ``name`` whole (a reader sees the old content or the new, never part); its new tag."""
        raise NotImplementedError

    def create(self, name: str, data: bytes) -> str | None:
        """Write ``name`` only if there is none: its tag, or None when one was there (nothing written)."""
        raise NotImplementedError

    def swap(self, name: str, data: bytes, tag: str) -> str | None:
        """Replace ``name`` only if it is still the version ``tag``: the new tag, or None (nothing written)."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """The names of all files under ``prefix`` (recursively), sorted."""
        raise NotImplementedError

    def delete(self, name: str, tag: str | None = None) -> bool:
        """Remove ``name`` (only if it is still version ``tag``, when given); whether it was removed."""
        raise NotImplementedError

    def upload(self, name: str, local: Path) -> str:
        """Write ``name`` with the content of the local file ``local``; its new tag."""
        return self.put(name, Path(local).read_bytes())

    def chunks(self, name: str) -> Iterator[bytes]:
        """The content of ``name`` in pieces of about 1 MiB. Raises FileNotFoundError."""
        yield self.read(name)

    def digest(self, name: str) -> str:
        """SHA-256 (hex) of ``name``'s content, read in pieces. Raises FileNotFoundError."""
        h = hashlib.sha256()
        for piece in self.chunks(name):
            h.update(piece)
        return h.hexdigest()

    def download(self, name: str, local: Path) -> str:
        """Copy ``name`` to the local file ``local`` (atomically, in pieces); its SHA-256.
        Raises FileNotFoundError."""
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with atomic_path(local) as tmp, open(tmp, "wb") as f:
            for piece in self.chunks(name):
                h.update(piece)
                f.write(piece)
        return h.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStorage(Storage):
    """A folder on a local or mounted file system: writes are a temporary file renamed over the name."""

    def __init__(self, root: str | Path):
        text = str(root)
        self.root = Path(text[len("file://"):] if text.startswith("file://") else text)
        self.location = str(self.root)

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self.root / name)

    def uri(self, name: str = "") -> str:
        return str(self.root / name) if name else self.location

    def _p(self, name: str) -> Path:
        return self.root / name if name else self.root

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        data = self._p(name).read_bytes()
        return data, _sha(data)

    def put(self, name: str, data: bytes) -> str:
        path = self._p(name)
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return _sha(data)

    def create(self, name: str, data: bytes) -> str | None:
        path = self._p(name)
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
        with write_errors(path):
            try:
                tmp.write_bytes(data)  # whole before it has the name
                os.link(tmp, path)  # fails if the name exists: create-only, and atomic
            except FileExistsError:
                return None
            finally:
                tmp.unlink(missing_ok=True)
        return _sha(data)

    def swap(self, name: str, data: bytes, tag: str) -> str | None:
        # (not atomic against another writer: a local run directory's writers are serialized by its
        # kernel lock, rundir.py; this is here so that both stores answer the same calls)
        try:
            if self.read_tagged(name)[1] != tag:
                return None
        except FileNotFoundError:
            return None
        return self.put(name, data)

    def exists(self, name: str) -> bool:
        return self._p(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, name: str, tag: str | None = None) -> bool:
        path = self._p(name)
        try:
            if tag is not None and self.read_tagged(name)[1] != tag:
                return False
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def chunks(self, name: str) -> Iterator[bytes]:
        with open(self._p(name), "rb") as f:
            while piece := f.read(_PIECE):
                yield piece


def _client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("An s3:// run directory needs boto3: pip install 'probekit[s3]' (or pip install boto3).") \
            from None
    # endpoint, region and credentials: boto3's own sources (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ...)
    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))


class S3Storage(Storage):
    """The objects under ``s3://bucket/prefix`` (see the module docstring for the protocol)."""

    def __init__(self, uri: str):
        m = re.match(r"^s3://([^/]+)/?(.*)$", uri)
        if m is None:
            raise ConfigError(f"{uri!r} is not an S3 address: write s3://bucket/prefix.")
        self.bucket, self.prefix = m.group(1), m.group(2).strip("/")
        self.location = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._c: Any = None

    def __getstate__(self) -> dict:  # picklable (Ray tasks): the client is made again where it is used
        return {**self.__dict__, "_c": None}

    @property
    def client(self) -> Any:
        if self._c is None:
            self._c = _client()
        return self._c

    def child(self, name: str) -> S3Storage:
        return S3Storage(f"s3://{self.bucket}/{_join(self.prefix, name)}")

    def _key(self, name: str) -> str:
        return _join(self.prefix, name)

    def _fail(self, exc: Exception, name: str) -> NoReturn:
        """Raise what a failed call means: FileNotFoundError for a missing object, WriteError for a refusal."""
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(self.uri(name)) from None
        if code == "NoSuchBucket":
            raise WriteError(f"No bucket {self.bucket!r} at {self.uri()}: create it, or choose another --out.") \
                from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise WriteError(f"Cannot write {self.uri(name)} ({code}). Check the AWS credentials "
                             "(AWS_ACCESS_KEY_ID, AWS_PROFILE) or choose another --out.") from None
        raise exc

    @staticmethod
    def _refused(exc: Exception) -> bool:
        err = getattr(exc, "response", {}) or {}
        code = err.get("Error", {}).get("Code", "")
        status = err.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            self._fail(exc, name)
        return r["Body"].read(), r["ETag"]

    def chunks(self, name: str) -> Iterator[bytes]:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            self._fail(exc, name)
        yield from r["Body"].iter_chunks(_PIECE)

    def upload(self, name: str, local: Path) -> str:
        with open(local, "rb") as f:  # (streamed from the file, not read whole)
            try:
                return str(self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=f)["ETag"])
            except Exception as exc:
                self._fail(exc, name)

    def put(self, name: str, data: bytes) -> str:
        try:
            return str(self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)["ETag"])
        except Exception as exc:
            self._fail(exc, name)
            raise

    def create(self, name: str, data: bytes) -> str | None:
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, IfNoneMatch="*")
        except Exception as exc:
            if self._refused(exc):
                return None
            self._fail(exc, name)
        return str(r["ETag"])

    def swap(self, name: str, data: bytes, tag: str) -> str | None:
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, IfMatch=tag)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if self._refused(exc) or code in ("NoSuchKey", "404"):
                return None
            self._fail(exc, name)
        return str(r["ETag"])

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except Exception as exc:
            try:
                self._fail(exc, name)
            except FileNotFoundError:
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix)
        base = base + "/" if base else ""
        cut = len(self.prefix) + 1 if self.prefix else 0
        names: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                names += [o["Key"][cut:] for o in page.get("Contents", [])]
        except Exception as exc:
            self._fail(exc, prefix)
        return sorted(names)

    def delete(self, name: str, tag: str | None = None) -> bool:
        if not self.exists(name):
            return False
        kw = {"IfMatch": tag} if tag is not None else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name), **kw)
            return True
        except Exception as exc:
            if self._refused(exc):
                return False
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if tag is None or code not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                self._fail(exc, name)
        # a server without conditional deletes: compare, then delete (a narrow race, for releasing a lock only)
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        if head["ETag"] != tag:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        return True


def storage_for(where: str | Path) -> Storage:
    """The storage of a run directory given as a path or a URI.

    Raises:
        ConfigError: a URI of a store other than S3 (or an S3-compatible server).
    """
    text = str(where)
    if not is_uri(text):
        return LocalStorage(text)
    scheme = _SCHEME.match(text).group(1).lower()  # type: ignore[union-attr]
    if scheme in ("s3", "s3a"):
        return S3Storage("s3://" + text.split("://", 1)[1])
    raise ConfigError(f"{text}: run directories can be local or mounted folders, or s3:// prefixes (also on "
                      f"S3-compatible servers, through AWS_ENDPOINT_URL); a {scheme}:// store is not supported "
                      "because its run lock needs conditional writes. Mount it as a folder, or use s3://.")
