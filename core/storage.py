"""Storage on any fsspec URI: a local path (with or without ``file://``) or ``s3://bucket/key``.

Every stage reads and writes through these functions, so a pipeline runs unchanged against local disk
or an S3-compatible object store (AWS, MinIO, moto in tests). S3 goes through s3fs, configured by
:class:`StorageOptions`; other fsspec protocols work with their defaults.

Writes are atomic: a reader sees the old object or the new one, never half of one. That is what lets a
stage write ``manifest.json`` last and treat its presence as "this output is complete" (docs/design.md), and
what makes a Ray task that is retried halfway overwrite its own output cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from core.errors import ConfigError

logger = logging.getLogger(__name__)

_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local")
_GLOB_CHARS = ("*", "?", "[")
# Spark/Hadoop convention, which Ray Data follows too: names starting with these are bookkeeping
# (`_SUCCESS`, `.part.tmp`, our own atomic-write temp files), not data.
_HIDDEN_PREFIXES = (".", "_")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Every field left at None falls back to the usual AWS settings."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. ``http://127.0.0.1:9000`` for MinIO. None: env ``AWS_ENDPOINT_URL_S3``, then
    ``AWS_ENDPOINT_URL``, then AWS itself."""

    key: str | None = None
    """Access key id. None: botocore's credential chain (env ``AWS_ACCESS_KEY_ID``, profile, IAM role)."""

    secret: str | None = field(default=None, repr=False)
    """Secret access key. None: botocore's credential chain (env ``AWS_SECRET_ACCESS_KEY``, ...)."""

    token: str | None = field(default=None, repr=False)
    """Session token for temporary credentials. None: botocore's chain (env ``AWS_SESSION_TOKEN``)."""

    region: str | None = None
    """Region name. None: env ``AWS_DEFAULT_REGION``, then ``AWS_REGION``, then botocore's default."""

    anon: bool = False
    """Unsigned requests, for public buckets."""

    def resolved(self) -> StorageOptions:
        """A copy with the endpoint and region that this process's environment supplies filled in.

        Call it on the Ray driver before shipping options to workers: a worker's environment is the one
        Ray started it with, which need not match the driver's (a local Ray started before the endpoint
        variables were set, or a cluster node with other settings). Credentials are not copied: they stay
        in each process's environment (or the cluster's secret, or an instance role), where botocore's
        credential chain finds them, and never become part of a Ray task's arguments, where Ray's task
        tables, dashboards and error messages could show them.
        """
        env = os.environ
        return replace(
            self,
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=self.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
        )

    def __getstate__(self) -> dict[str, Any]:
        """What a pickled copy carries (Ray pickles task and actor arguments): everything but credentials.

        Credentials given explicitly stay in this process; a worker that unpickles the options falls back
        to botocore's credential chain in its own environment.
        """
        return {**self.__dict__, "key": None, "secret": None, "token": None}

    def __copy__(self) -> StorageOptions:
        return self  # frozen: a copy within this process is the same options, credentials included

    def __deepcopy__(self, memo: dict[int, Any]) -> StorageOptions:
        return self

    def fsspec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem``.

        Endpoint and region are resolved from the environment here; credentials left at None are left to
        s3fs/botocore, which read the environment, profiles and instance roles themselves.
        """
        env = os.environ
        endpoint_url = self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = self.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        # Listings are not cached: Ray workers write into prefixes the driver lists afterwards, and a
        # stale listing would hide their output.
        kwargs: dict[str, Any] = {"anon": self.anon, "use_listings_cache": False}
        if self.key is not None:
            kwargs["key"] = self.key
        if self.secret is not None:
            kwargs["secret"] = self.secret
        if self.token is not None:
            kwargs["token"] = self.token
        client_kwargs: dict[str, str] = {}
        if endpoint_url:
            client_kwargs["endpoint_url"] = endpoint_url
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        return kwargs


@dataclass(frozen=True)
class FileInfo:
    """One file found by :func:`expand`."""

    uri: str
    """Full URI, keeping the scheme of the pattern (``s3://bucket/key``, ``file:///abs``, or ``/abs``)."""

    size: int
    """Size in bytes."""

    mtime: float | None
    """Last modification, seconds since the epoch; None where the store does not say."""


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (``bucket/key`` for S3, absolute locally).

    Instances come from fsspec's own instance cache, keyed by the constructor arguments, so calling this
    per file costs nothing after the first call with the same options.
    """
    protocol = _protocol(uri)
    if protocol in _S3_PROTOCOLS:
        import s3fs  # deferred: pulls in aiobotocore, which local-only users never need

        fs: fsspec.AbstractFileSystem = s3fs.S3FileSystem(**(options or StorageOptions()).fsspec_kwargs())
    elif protocol in _LOCAL_PROTOCOLS:
        fs = fsspec.filesystem("file")
    else:
        fs = fsspec.filesystem(protocol)
    # _strip_protocol makes a local path absolute, so URIs handed to Ray workers do not depend on cwd.
    return fs, fs._strip_protocol(uri)


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for ``uri``, e.g. for ``ray.data.read_parquet(path, filesystem=fs)``."""
    fs, path = filesystem(uri, options)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _to_uri(pattern: str, path: str) -> str:
    """Turn a filesystem path back into a URI in the style of ``pattern``."""
    protocol = _protocol(pattern)
    if "://" not in pattern:
        return path
    if protocol in _LOCAL_PROTOCOLS:
        return f"file://{path}"
    return f"{pattern.split('://', 1)[0]}://{path}"


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None


def file_mtime(info: dict[str, Any]) -> float | None:
    """The modification time (seconds since the epoch) in an fsspec ``info``/``find(detail=True)`` entry."""
    return _mtime(info)


def _is_hidden(path: str, root: str) -> bool:
    relative = posixpath.relpath(path, root) if root else path
    return any(part.startswith(_HIDDEN_PREFIXES) for part in relative.split("/"))


def _glob_root(path: str) -> str:
    """The directory part of a glob before its first wildcard."""
    parts = path.split("/")
    static = []
    for part in parts:
        if any(char in part for char in _GLOB_CHARS):
            break
        static.append(part)
    return "/".join(static)


def _expand_one(pattern: str, options: StorageOptions | None) -> list[FileInfo]:
    fs, path = filesystem(pattern, options)
    if any(char in path for char in _GLOB_CHARS):
        root = _glob_root(path)
        # A pattern that names hidden files itself (".../_manifest*") wants them.
        wants_hidden = posixpath.basename(path).startswith(_HIDDEN_PREFIXES)
        matches = fs.glob(path, detail=True)
        infos = [
            (name, info)
            for name, info in matches.items()
            if info.get("type") == "file" and (wants_hidden or not _is_hidden(name, root))
        ]
    elif fs.isdir(path):
        infos = [
            (name, info)
            for name, info in fs.find(path, detail=True).items()
            if info.get("type") == "file" and not _is_hidden(name, path)
        ]
    elif fs.isfile(path):
        infos = [(path, fs.info(path))]
    else:
        infos = []
    return [FileInfo(_to_uri(pattern, name), int(info.get("size") or 0), _mtime(info)) for name, info in infos]


def expand(
    pattern: str | list[str], options: StorageOptions | None = None, config_field: str = "corpus"
) -> list[FileInfo]:
    """Every file that ``pattern`` names, sorted by URI and deduplicated.

    A pattern is a file, a directory (every file under it, recursively) or a glob (``*``, ``?``, ``[..]``,
    and ``**`` across directories). Names starting with ``.`` or ``_`` under a directory or glob root are
    skipped, unless the glob's last component asks for them. ``config_field`` names the config field in the
    :class:`ConfigError` raised when nothing matches.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    found: dict[str, FileInfo] = {}
    for one in patterns:
        for info in _expand_one(one, options):
            found.setdefault(info.uri, info)
    if not found:
        raise ConfigError(
            config_field, pattern, "matches no file; check the path, the glob and, for s3://, the endpoint"
        )
    return [found[uri] for uri in sorted(found)]


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/``, keeping the scheme: ``join("s3://b", "x", "y.json") == "s3://b/x/y.json"``."""
    result = base
    for part in parts:
        if not part:
            continue
        if result.endswith("://") or not result:
            result = result + part.lstrip("/")
        else:
            result = result.rstrip("/") + "/" + part.lstrip("/")
    return result


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether a file or directory (an S3 prefix with objects under it) exists at ``uri``."""
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def open_read(uri: str, options: StorageOptions | None = None) -> IO[bytes]:
    """A binary file object for reading; use it as a context manager."""
    fs, path = filesystem(uri, options)
    return fs.open(path, "rb")


_PROC_STATUS = "/proc/self/status"


def _proc_umask() -> int | None:
    """The umask as Linux (4.7 and later) shows it in ``/proc/self/status``; None where it does not."""
    with contextlib.suppress(OSError, ValueError):
        with open(_PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return None


def _umask_at_import() -> int:
    mask = _proc_umask()
    if mask is None:
        # Read by setting it and putting it back, once: a file another thread creates meanwhile gets the
        # stricter 077, never a looser mode.
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """This process's umask, read without changing it.

    ``os.umask`` can only read the mask by setting it, and the mask is process-wide: a thread that creates
    a file while another toggles it gets the wrong mode. So the mask comes from ``/proc/self/status``
    where Linux shows it, and elsewhere is the one the process had when this module was imported.
    """
    mask = _proc_umask()
    return _UMASK_AT_IMPORT if mask is None else mask


def _durable_temp_file(path: str, data: bytes | bytearray | memoryview) -> str:
    """`data` in a new, fsynced temp file beside `path`; returns the temp file's path.

    It sits in the destination directory so that renaming or linking it is one step within one filesystem,
    which POSIX makes atomic. Its leading dot hides it from expand() and Ray Data. ``mkstemp`` creates it
    0600; it gets the mode any other tool's new file would have (0666 less the umask) before it is named,
    so that the artifacts other users and services read are readable under the usual umask of 022.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    return temp_path


def _write_local_atomic(path: str, data: bytes | bytearray | memoryview) -> None:
    directory = os.path.dirname(path) or "."
    temp_path = _durable_temp_file(path, data)
    try:
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    # Persist the rename itself; without this a crash can leave the directory entry pointing nowhere.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes_atomic(uri: str, data: bytes | bytearray | memoryview, options: StorageOptions | None = None) -> None:
    """Write ``data`` so that readers see either the previous content or all of the new one.

    Locally: a temp file in the same directory, fsync, then ``os.replace``. On S3 (and other object
    stores): one upload. An object only becomes visible when its PUT (or, for big objects, the
    multipart upload's final CompleteMultipartUpload) succeeds, and it then replaces the old object as a
    whole, so no temp-and-rename is needed; a rename on S3 would be a copy plus delete, which is not
    atomic at all.
    """
    fs, path = filesystem(uri, options)
    if isinstance(fs, LocalFileSystem):
        _write_local_atomic(path, data)
    else:
        fs.pipe_file(path, bytes(data))
    logger.debug("wrote %d bytes to %s", len(data), uri)


def write_bytes_exclusive(uri: str, data: bytes, options: StorageOptions | None = None) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there yet; True if this call created it.

    The check and the write are one atomic step, so of several writers racing for one name exactly one
    wins. Locally: the data goes to a temp file first, then ``os.link`` names it, which fails if the name
    exists (readers never see a half-written object, unlike ``O_EXCL`` followed by a write). On S3: a PUT
    with ``If-None-Match: *`` (S3 conditional writes, 2024; s3fs ``mode="create"``), which the store
    refuses with 412 when the key exists, and with 409 ConditionalRequestConflict while another conditional
    write to the key is in flight: that is asked again a few times, then counted as a lost race (False).
    A store that ignores the header would make this an overwrite:
    check it with a test against your store.
    """
    fs, path = filesystem(uri, options)
    if isinstance(fs, LocalFileSystem):
        temp_path = _durable_temp_file(path, data)
        try:
            os.link(temp_path, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path)
        return True
    for attempt in range(_CONFLICT_RETRIES + 1):
        try:
            fs.pipe_file(path, bytes(data), mode="create")
        except FileExistsError:
            return False
        except OSError as err:
            # s3fs maps a 412 without the "Condition" field (some S3-compatible stores) to a plain EINVAL.
            if "precondition" in str(err).lower():
                return False
            if not _is_conditional_conflict(err):
                raise
            # 409 ConditionalRequestConflict: another conditional write to this key was in flight. Asking
            # again settles it (the other write landed: 412; it failed: ours may win); if the key stays
            # contested, this writer lost the race.
            if attempt == _CONFLICT_RETRIES:
                logger.info("exclusive create of %s: still contested after %d tries, lost the race", uri, attempt + 1)
                return False
            time.sleep(0.05 * 2**attempt)
        else:
            return True
    return False


# Retries of an exclusive create that S3 answers with 409 ConditionalRequestConflict.
_CONFLICT_RETRIES = 4


def _is_conditional_conflict(err: OSError) -> bool:
    """Whether `err` is S3's 409 ConditionalRequestConflict, which s3fs raises as a plain OSError (EIO)."""
    cause = err.__cause__
    response = getattr(cause, "response", None) or {}
    code = (response.get("Error") or {}).get("Code")
    return code == "ConditionalRequestConflict" or "ConditionalRequestConflict" in str(err)


def write_json_atomic(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically. Serialised before anything is touched."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(uri, text.encode("utf-8"), options)


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    """Parse the JSON file at ``uri``."""
    with open_read(uri, options) as handle:
        return json.load(handle)


def write_parquet_atomic(table: pa.Table, uri: str, options: StorageOptions | None = None) -> None:
    """Write ``table`` as one Parquet file, atomically.

    The table is serialised into memory first, so a failure while encoding leaves the old file as it
    was. Meant for tables that fit in memory (rejects, reports); big outputs go through Ray Data.
    """
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_bytes_atomic(uri, buffer.getvalue().to_pybytes(), options)


def read_parquet(uri_or_dir: str, options: StorageOptions | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file, or every ``*.parquet`` file under a directory (sorted by name), as one table."""
    fs, path = filesystem(uri_or_dir, options)
    if fs.isdir(path):
        files = [info.uri for info in expand(uri_or_dir, options, config_field="path") if info.uri.endswith(".parquet")]
        if not files:
            raise FileNotFoundError(f"no *.parquet file under {uri_or_dir}")
    else:
        files = [uri_or_dir]
    tables = []
    for file_uri in files:
        with open_read(file_uri, options) as handle:
            tables.append(pq.read_table(handle, columns=columns))
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default")


def remove(uri_or_dir: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a directory tree; nothing happens if it does not exist."""
    fs, path = filesystem(uri_or_dir, options)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass  # removed by someone else in between: the goal is reached all the same


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    """Create a directory and its parents (a no-op on object stores, where prefixes need no creation)."""
    fs, path = filesystem(uri, options)
    fs.makedirs(path, exist_ok=True)


def absolute(uri: str) -> str:
    """A local path made absolute (workers may run in another directory, as Ray Train's do); a remote URI
    as it is."""
    return uri if is_remote(uri) else os.path.abspath(uri)


def is_remote(uri: str) -> bool:
    return _protocol(uri) not in ("file", "local")


class UnsafeKeyError(ValueError):
    """A remote key or file name that would land outside the directory it is copied into."""


def contained_name(name: str, key: str) -> str:
    """``name``, a ``/``-separated path relative to a directory, normalised; refused if it leaves that directory.

    Every copy between a tree of remote keys and a local directory (``local_copy``, ``upload_dir``) maps its
    names through here. An object key is any string: ``team/sae/../../home/x`` is a valid key, and anyone who
    may write under a shared prefix could otherwise make a download write files anywhere the reader may.
    ``key`` is the full key or path ``name`` came from, named in the error. Raises :class:`UnsafeKeyError`
    for an absolute name, one that climbs above the directory (``..``), or one that is the directory itself.
    """
    normal = posixpath.normpath(name) if name else "."
    if name.startswith("/") or normal in (".", "..") or normal.startswith("../"):
        raise UnsafeKeyError(
            f"{key!r} resolves to {name!r}, outside the directory it is copied into: refused, nothing was copied"
        )
    return normal


def _download_plan(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, str]]:
    """(remote key, local name relative to the download directory) for every file of a remote directory."""
    plan: dict[str, str] = {}
    prefix = path.rstrip("/")
    for remote in fs.find(path):
        local = contained_name(remote[len(prefix) + 1 :], remote)
        if local in plan:
            raise UnsafeKeyError(f"{remote!r} and {plan[local]!r} both land on {local!r}: refused, nothing was copied")
        plan[local] = remote
    return [(remote, local) for local, remote in plan.items()]


def local_copy(uri: str, options: StorageOptions | None = None, *, within: str | None = None) -> str:
    """A local path holding the file or directory at ``uri``: the path itself when local, else a download.

    Downloads land in a fresh temporary directory (created in ``within`` when given, so that a caller can
    rename it into place on the same filesystem), so a changed remote object is never served stale. Every
    key is checked before anything is written: a key that would resolve outside the download directory
    raises :class:`UnsafeKeyError` naming it, and no file (nor the directory) is left behind.
    """
    fs, path = filesystem(uri, options)
    if not is_remote(uri):
        return path
    is_dir = fs.isdir(path)
    if is_dir:
        plan = _download_plan(fs, path)
    else:
        plan = [(path, contained_name(posixpath.basename(path), path))]
    target = tempfile.mkdtemp(prefix="finescope-", dir=within)
    try:
        for remote, local in plan:
            destination = os.path.join(target, *local.split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            fs.get_file(remote, destination)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target if is_dir else os.path.join(target, plan[0][1])


def upload_dir(local_dir: str, uri: str, options: StorageOptions | None = None) -> None:
    """Copy a local directory's files to ``uri`` (local or remote), each file written atomically.

    Every name is checked (:func:`contained_name`) before the first write, so nothing lands outside ``uri``.
    """
    files = []
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = "/".join(os.path.relpath(path, local_dir).split(os.sep))
            files.append((path, contained_name(relative, path)))
    for path, relative in files:
        with open(path, "rb") as handle:
            write_bytes_atomic(join(uri, *relative.split("/")), handle.read(), options)


def arrow_target(uris: str | list[str], options: StorageOptions | None = None) -> dict[str, Any]:
    """Ray Data's `path` and `filesystem` arguments for one local or remote URI, or several on one store."""
    many = isinstance(uris, list)
    pairs = [pyarrow_filesystem(uri, options) for uri in (uris if many else [uris])]
    paths = [path for _, path in pairs]
    return {"path": paths if many else paths[0], "filesystem": pairs[0][0]}


def strip_scheme(uri: str) -> str:
    """The path pyarrow filesystems take: ``s3://bucket/key`` -> ``bucket/key``."""
    return uri.split("://", 1)[1] if "://" in uri else uri


__all__ = [
    "is_remote",
    "local_copy",
    "strip_scheme",
    "upload_dir",
    "FileInfo",
    "StorageOptions",
    "UnsafeKeyError",
    "contained_name",
    "current_umask",
    "exists",
    "expand",
    "filesystem",
    "join",
    "makedirs",
    "open_read",
    "pyarrow_filesystem",
    "arrow_target",
    "read_json",
    "read_parquet",
    "remove",
    "write_bytes_atomic",
    "write_bytes_exclusive",
    "write_json_atomic",
    "write_parquet_atomic",
]
