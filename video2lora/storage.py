"""fsspec helpers shared by the library, pipelines and jobs.

Every function takes a URI: a local path or any fsspec URL (``s3://bucket/key``, ``memory://...``).
Error messages go through :func:`redact` so they never carry credentials.
"""

import fcntl
import hashlib
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 0.2
RETRY_MAX_DELAY = 5.0

# Transient failures worth another try. FileNotFoundError / PermissionError are OSErrors too,
# but retrying them only delays a certain failure: see _PERMANENT.
RETRY_ON: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)
try:
    from botocore.exceptions import ConnectionError as _BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    RETRY_ON += (_BotoConnectionError, HTTPClientError, IncompleteReadError)
except ImportError:  # botocore is only needed for s3://
    pass
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*(?::[^@\s]*)?@")
_SECRET_QUERY = re.compile(
    r"([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|sig|token)=)[^&\s'\"]+",
    re.IGNORECASE,
)
_URL_CREDENTIALS = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^/@\s]*@|[^/@:\s]*:(?!\d+(?:/|$))[^@\s]*@)")
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_PARTIAL_WRITE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # write_bytes_atomic's temporary ".NAME.XXXXXXXX.tmp"


class StorageError(RuntimeError):
    """A read/write failed; the message names the (redacted) URI and the reason."""


def redact(text: str) -> str:
    """Remove credentials from ``text``: URL user:password, signed-URL query values, AWS keys from the env."""
    text = _URL_USERINFO.sub(r"\1***@", str(text))
    text = _SECRET_QUERY.sub(r"\1***", text)
    for var in _SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value:
            text = text.replace(value, "***")
    return text


def has_credentials(uri: str) -> bool:
    """True for a URL with ``user[:password]@`` in it (e.g. ``s3://KEY:SECRET@bucket/key``; the password may
    hold a ``/``, so ``host:port/path@x`` is told apart by its port)."""
    return bool(_URL_CREDENTIALS.match(str(uri)))


def _fail(action: str, uri: str, err: BaseException) -> StorageError:
    # A library's own message may quote a URL's credentials in pieces that redact() cannot recognise
    # (s3fs takes "KEY:SECRET@bucket" for a bucket name), so it is withheld for such URLs.
    detail = "details withheld: the URI has credentials in it" if has_credentials(uri) else redact(str(err))
    return StorageError(f"cannot {action} {redact(uri)}: {type(err).__name__}: {detail}")


def retry(fn, *, attempts=None, base_delay=None, max_delay=None, retry_on=RETRY_ON):
    """Call ``fn()``, retrying transient errors with exponential backoff and jitter.

    Defaults come from the module-level ``RETRY_*`` constants (read at call time, so tests can patch them).
    """
    attempts = attempts or RETRY_ATTEMPTS
    base_delay = RETRY_BASE_DELAY if base_delay is None else base_delay
    max_delay = RETRY_MAX_DELAY if max_delay is None else max_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except _PERMANENT:
            raise
        except retry_on as err:
            if attempt == attempts:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logger.warning(
                "attempt %d/%d failed (%s: %s), retrying in %.2fs",
                attempt, attempts, type(err).__name__, redact(str(err)), delay,
            )
            time.sleep(delay)


def fs_and_path(uri: str, **storage_options):
    """``(filesystem, path)`` for a local path or fsspec URL."""
    return fsspec.core.url_to_fs(uri, **storage_options)


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL (URLs always use ``/``)."""
    if "://" not in base:
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def safe_child(base: str, name: str) -> str:
    """``base/name`` for a user-supplied ``name`` (e.g. a sample_id) that can never escape ``base``."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        shown = repr(name if not isinstance(name, str) or len(name) <= 64 else name[:64] + "...")
        raise ValueError(
            f"unsafe name {shown}: names must be 1-200 characters from [A-Za-z0-9._-] and not '.' or '..'"
        )
    return join(base, name)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a whole file. With ``max_bytes``, a larger file is refused after reading at most ``max_bytes + 1``."""
    fs, path = fs_and_path(uri)
    end = None if max_bytes is None else max_bytes + 1
    try:
        data = retry(lambda: fs.cat_file(path, end=end))
    except FileNotFoundError:
        raise StorageError(f"cannot read {redact(uri)}: file not found") from None
    except Exception as err:
        raise _fail("read", uri, err) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise StorageError(f"cannot read {redact(uri)}: file is larger than max_bytes={max_bytes}")
    return data


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a partial file."""
    fs, path = fs_and_path(uri)

    def write_local():
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")  # see _PARTIAL_WRITE
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    try:
        # Object stores publish an object only when its (single or multipart) upload completes.
        retry(write_local if _is_local(fs) else lambda: fs.pipe_file(path, data))
    except Exception as err:
        raise _fail("write", uri, err) from None


def remove_partial_writes(directory: str) -> list[str]:
    """Delete the temporary files that :func:`write_bytes_atomic` leaves directly under ``directory`` when its
    process is killed mid-write; returns their paths. Local paths only (an object store never shows an unfinished
    upload). Call it only while nothing is writing there."""
    fs, path = fs_and_path(directory)
    if not _is_local(fs) or not os.path.isdir(path):
        return []
    removed = []
    for name in os.listdir(path):
        if _PARTIAL_WRITE.fullmatch(name):
            os.unlink(os.path.join(path, name))
            removed.append(os.path.join(path, name))
    return removed


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)  # another process may have written it since we last listed
    try:
        return retry(lambda: fs.exists(path))
    except Exception as err:
        raise _fail("check", uri, err) from None


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Sorted URIs of the files directly under ``uri`` (not recursive); ``[]`` if it does not exist."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    try:
        entries = retry(lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return []
    except Exception as err:
        raise _fail("list", uri, err) from None
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "file")
    return [join(uri, n) for n in names if suffix is None or n.endswith(suffix)]


def read_many(uris: list[str]) -> dict[str, bytes | Exception]:
    """Many small files at once (concurrent requests on object stores): URI -> its bytes, or the error reading it.
    All URIs must be on one filesystem."""
    if not uris:
        return {}
    fs, _ = fs_and_path(uris[0])
    paths = [fs_and_path(u)[1] for u in uris]
    try:
        got = retry(lambda: fs.cat(paths, on_error="return"))
    except Exception as err:
        raise _fail("read", uris[0], err) from None
    if not isinstance(got, dict):  # one path: fsspec returns its bytes
        got = {paths[0]: got}
    return {u: got.get(p, FileNotFoundError(p)) for u, p in zip(uris, paths)}


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a directory tree with ``recursive=True``); a missing path is not an error."""
    fs, path = fs_and_path(uri)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    except Exception as err:
        raise _fail("remove", uri, err) from None


def default_cache_dir() -> str:
    """Where remote backbones and built defaults are cached: $VIDEO2LORA_CACHE, else ~/.cache/video2lora."""
    return os.environ.get("VIDEO2LORA_CACHE") or os.path.expanduser("~/.cache/video2lora")


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """Local path of a directory: local paths are returned as is, remote ones are downloaded once into a cache.

    The cache entry is ``<cache_dir>/<name>-<hash(uri)>``. Callers on one machine (e.g. several actors on a node)
    take a file lock on the entry first, so exactly one downloads while the others wait and then reuse its copy.
    Files are downloaded into a temporary sibling that gets a ``.complete`` marker and is then renamed into place,
    so a crash mid-download is redone on the next call and a reader never sees a partial copy.
    """
    fs, path = fs_and_path(uri)
    if _is_local(fs):
        return path
    root = path.rstrip("/")
    name = f"{posixpath.basename(root)}-{content_hash(uri.rstrip('/').encode())[:16]}"
    target = os.path.join(cache_dir or default_cache_dir(), name)
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    # the lock lives beside no cache entry (a cache dir holds copies only), keyed by the entry's absolute path
    locks = os.path.join(tempfile.gettempdir(), "video2lora-locks")
    os.makedirs(locks, exist_ok=True)
    with open(os.path.join(locks, content_hash(os.path.abspath(target).encode())[:32] + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not os.path.exists(os.path.join(target, ".complete")):  # another caller may have copied meanwhile
            _download(fs, root, uri, target)
    return target


def _download(fs, root: str, uri: str, target: str) -> None:
    start = time.perf_counter()
    try:
        remote_files = retry(lambda: fs.find(root))
    except Exception as err:
        raise _fail("list", uri, err) from None
    if not remote_files:
        raise StorageError(f"cannot copy {redact(uri)}: no files found")
    tmp = f"{target}.partial-{uuid.uuid4().hex[:8]}"
    local_files = [os.path.join(tmp, *posixpath.relpath(f, root).split("/")) for f in remote_files]
    for d in {os.path.dirname(f) for f in local_files}:
        os.makedirs(d, exist_ok=True)
    try:
        retry(lambda: fs.get(remote_files, local_files))
        open(os.path.join(tmp, ".complete"), "w").close()
        os.rename(tmp, target)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(target, ".complete")):  # unless a caller elsewhere (a shared cache) finished it
            raise _fail("copy", uri, err) from None
        return
    logger.info("copied %s (%d files) to %s in %.1fs", redact(uri), len(remote_files), target, time.perf_counter() - start)
