"""Object stores (``s3://``) for ``data_pipeline.storage``: :class:`RemotePath`, clients, errors.

Only ``data_pipeline.storage`` imports this module (it re-exports ``RemotePath`` and
``StorageError``); see its docstring for the vocabulary a location speaks. Here: the s3fs client
(one per process, options and AWS environment: a forked DataLoader worker makes its own), the
translation of every remote failure into one :class:`StorageError` line, and the sample read.

A sample read (:meth:`RemotePath.read_range`) is one ranged GET of a presigned URL of the shard
(signed by s3fs/botocore once per shard and ``URL_TTL_S``) through urllib3, botocore's own HTTP
library: about 0.7 ms of client CPU per request instead of about 2.5 ms through botocore's whole
request path, which matters when a data worker issues a GET per sample next to its JPEG decoding.
It is retried (``HTTP_RETRIES`` with backoff, connect/read timeouts ``HTTP_TIMEOUTS``), so a
dropped connection costs a few seconds and a stalled one about ``READ_BOUND_S``, never a hang.
Everything else (listing, HEAD, whole-object GET/PUT) goes through s3fs.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import logging
import os
import time
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

SCHEMES = ("s3",)  # remote schemes seer serves (fsspec protocol names)
DEFAULT_OPTIONS = {  # s3fs options under the user's (data.storage_options, deep-merged)
    "use_listings_cache": False,  # a listing is always fresh (online mode polls for new shards)
    "config_kwargs": {"connect_timeout": 3, "read_timeout": 5, "max_pool_connections": 64,
                      "retries": {"max_attempts": 3, "mode": "standard"}, "signature_version": "s3v4"},
    "retries": 1,  # s3fs's own retry loop around botocore's (nested: 1 = botocore's attempts only)
}
URL_TTL_S = 3600  # presigned URLs of shards are renewed 10 minutes before this
HTTP_RETRIES = {"total": 3, "backoff_factor": 0.2, "status_forcelist": (500, 502, 503, 504)}
HTTP_TIMEOUTS = {"connect": 3.0, "read": 5.0}
READ_BOUND_S = 4 * (3.0 + 5.0) + 1.4  # the longest a sample read can take: 4 attempts, their backoff


class StorageError(OSError):
    """A remote location that cannot be used; the message is one line naming the problem."""


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")
_FILESYSTEMS: dict = {}  # one client per process, options and AWS environment


def _filesystem(protocol: str, user_options: dict):
    """The fsspec filesystem for ``protocol`` with seer's defaults under ``user_options``."""
    import json

    env = tuple(os.environ.get(k) for k in _ENV_KEYS)
    token = (os.getpid(), protocol, json.dumps(user_options, sort_keys=True, default=str), env)
    if token not in _FILESYSTEMS:
        import fsspec

        for name in ("botocore", "aiobotocore", "s3fs"):  # "found credentials in ..." on every start
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        options = _merge(DEFAULT_OPTIONS, user_options)
        retries = options.pop("retries", None)
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if retries is not None:
            fs.retries = int(retries)  # a class attribute of s3fs, not an argument
        _FILESYSTEMS[token] = fs
    return _FILESYSTEMS[token]


class _HTTPStatus(Exception):
    """An HTTP answer a sample read cannot use, shaped like botocore's errors for :func:`translate`."""

    def __init__(self, status: int, body: bytes):
        self.response = {"Error": {"Code": str(status)}}
        super().__init__(f"HTTP {status}: {body.decode('utf-8', 'replace')}")


_HTTP: dict = {}  # one urllib3 pool per process


def _http():
    """The urllib3 pool sample reads use (retries and timeouts: the module doc)."""
    pid = os.getpid()
    if pid not in _HTTP:
        import urllib3

        kwargs = {}
        try:
            import certifi  # botocore's CA bundle, for https endpoints

            kwargs["ca_certs"] = certifi.where()
        except ImportError:
            pass
        retries = urllib3.Retry(**HTTP_RETRIES, allowed_methods=["GET"], raise_on_status=False)
        _HTTP.clear()
        _HTTP[pid] = urllib3.PoolManager(maxsize=64, retries=retries, timeout=urllib3.Timeout(**HTTP_TIMEOUTS),
                                         **kwargs)
    return _HTTP[pid]


class RemotePath:
    """An object (or prefix, a "folder") in an S3-compatible store, named ``s3://bucket/key``.

    Picklable; the fsspec filesystem is made per process (a forked DataLoader worker makes its
    own: an s3fs client is not fork-safe)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.protocol, rest = url.split("://", 1)
        self.key = str(PurePosixPath("/" + rest.strip("/")))[1:]  # "bucket/pre/fix", normalised
        if not self.key:
            raise ValueError(f"{url}: no bucket named")
        if importlib.util.find_spec("s3fs") is None:
            raise ValueError(f"{url}: reading and writing s3:// needs s3fs: pip install 'seer[s3]'")
        self.options = dict(storage_options or {})
        self._fs, self._pid = None, None
        self._url, self._url_until = None, 0.0  # presigned URL for sample reads, and until when it is used

    # -- identity -------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __getstate__(self) -> dict:
        return {"protocol": self.protocol, "key": self.key, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fs=None, _pid=None, _url=None, _url_until=0.0)

    def _with_key(self, key: str) -> RemotePath:
        out = RemotePath.__new__(RemotePath)
        out.__setstate__({"protocol": self.protocol, "key": key, "options": self.options})
        return out

    def __truediv__(self, name) -> RemotePath:
        return self._with_key(f"{self.key}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> RemotePath:
        return self._with_key(str(PurePosixPath(self.key).parent)) if "/" in self.key else self

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    absolute = resolve

    # -- the filesystem and its errors ---------------------------------------------------------
    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = _filesystem(self.protocol, self.options), os.getpid()
        return self._fs

    @property
    def endpoint(self) -> str:
        opts = self.options
        return (opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - every remote failure becomes one clear line
            raise translate(self, what, err) from None

    def check(self) -> None:
        """That the bucket exists and these credentials may use it (a one-line StorageError if not)."""
        try:
            self._call("open", self.fs.call_s3, "head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            raise StorageError(f"{self}: no such bucket '{self.bucket}' at {self.endpoint}") from None

    # -- reading --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self._call("look up", self.fs.exists, self.key))

    def is_file(self) -> bool:
        return bool(self._call("look up", self.fs.isfile, self.key))

    def is_dir(self) -> bool:
        """A "folder" is any prefix of an existing bucket (objects make it non-empty)."""
        self.check()
        return True

    def stat(self) -> SimpleNamespace:
        info = self._call("look up", self.fs.info, self.key)
        modified = info.get("LastModified")
        mtime = modified.timestamp() if modified is not None else 0.0
        return SimpleNamespace(st_size=int(info.get("size", 0)), st_mtime=mtime, st_mtime_ns=int(mtime * 1e9),
                               etag=str(info.get("ETag", "")).strip('"'))

    def read_bytes(self) -> bytes:
        return self._call("read", self.fs.cat_file, self.key)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def read_range(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)``: one ranged GET of the object's presigned URL (module doc)."""
        if size <= 0:
            return b""
        for attempt in range(2):
            url = self._signed_url(renew=attempt > 0)
            try:
                response = _http().request("GET", url, headers={"Range": f"bytes={offset}-{offset + size - 1}"})
            except Exception as err:  # noqa: BLE001 - urllib3's MaxRetryError and kin, after its retries
                raise translate(self, "read", err) from None
            if response.status != 403:
                break  # a 403 may be an expired URL or session token: signed again once
        if response.status == 206:
            return response.data
        if response.status == 200:  # a server that ignores Range sends the whole object
            return response.data[offset:offset + size]
        if response.status == 416:
            return b""  # the range starts past the end
        if response.status == 404:
            raise FileNotFoundError(f"{self}: no such object")
        raise translate(self, "read", _HTTPStatus(response.status, response.data[:200]))

    def _signed_url(self, renew: bool = False) -> str:
        now = time.monotonic()
        if renew or self._url is None or now > self._url_until:
            self._url = self._call("sign", self.fs.url, self.key, expires=URL_TTL_S)
            self._url_until = now + URL_TTL_S - 600
        return self._url

    def open(self, mode: str = "rb", **kwargs):
        if "r" not in mode:
            raise ValueError(f"{self}: remote files are written whole (atomic_write_bytes), not opened for {mode!r}")
        return self._call("open", self.fs.open, self.key, mode, **kwargs)

    def _entries(self) -> list[dict]:
        try:
            return self._call("list", self.fs.ls, self.key, detail=True)
        except FileNotFoundError:  # a prefix without objects: an empty folder
            return []

    def iterdir(self) -> list[RemotePath]:
        return sorted(self._with_key(e["name"].rstrip("/")) for e in self._entries())

    def glob(self, pattern: str) -> list[RemotePath]:
        """Files (not prefixes) directly under this prefix whose names match ``pattern``."""
        entries = self._entries()
        return sorted(self._with_key(e["name"]) for e in entries
                      if e.get("type") == "file" and fnmatch.fnmatchcase(PurePosixPath(e["name"]).name, pattern))

    # -- writing (whole objects: a PUT is atomic) ------------------------------------------------
    def write_bytes(self, data: bytes) -> int:
        self._call("write", self.fs.pipe_file, self.key, bytes(data))
        return len(data)

    def upload(self, local: Path) -> None:
        self._call("write", self.fs.put_file, str(local), self.key)

    def download(self, local: Path) -> None:
        self._call("read", self.fs.get_file, self.key, str(local))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("delete", self.fs.rm_file, self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Prefixes need no making; the bucket must exist (checked)."""
        self.check()


def translate(location: RemotePath, what: str, err: BaseException) -> StorageError:
    """One line for a failed remote call: what was tried, where, and the cause in plain words."""
    if type(err).__name__ == "MaxRetryError" and isinstance(getattr(err, "reason", None), BaseException):
        err = err.reason  # urllib3 after its retries: the last cause
    kind = type(err).__name__
    text = " ".join(str(err).split()) or kind
    response = getattr(err, "response", None)
    code = str((response.get("Error") or {}).get("Code", "")) if isinstance(response, dict) else ""
    if isinstance(err, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                    "403", "Forbidden") or "Forbidden" in text:
        return StorageError(f"{location}: access denied at {location.endpoint} (check the credentials: "
                            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or data.storage_options)")
    if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return StorageError(f"{location}: no credentials for {location.endpoint} (set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or data.storage_options key/secret)")
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "NewConnectionError", "NameResolutionError", "gaierror", "InvalidURL") or "Could not connect" in text:
        return StorageError(f"{location}: cannot connect to endpoint {location.endpoint} ({text[:200]})")
    if kind in ("ConnectionClosedError", "ServerDisconnectedError", "ProtocolError", "ConnectionResetError"):
        return StorageError(f"{location}: the connection to {location.endpoint} was dropped ({what}, retries "
                            f"included): {text[:200]}")
    if kind in ("FSTimeoutError", "TimeoutError", "ReadTimeoutError"):
        return StorageError(f"{location}: {what} timed out at {location.endpoint} (retries included)")
    return StorageError(f"{location}: cannot {what} at {location.endpoint}: {kind}: {text[:300]}")
