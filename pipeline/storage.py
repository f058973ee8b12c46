"""The one module that knows URLs and filesystems: local paths and s3:// alike.

Everything else (shard tools, the data stream, checkpoints) calls these plain functions
and never touches fsspec itself. Accepted URLs: local paths, file://, s3://. Anything
else (webdataset's shell-running `pipe:`, http, gs, ...) is refused with RefusedURL.

S3 credentials come from the usual AWS environment variables or profiles;
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) selects an S3-compatible store. S3 failures
(bad credentials, missing bucket, unreachable endpoint) are raised as one-line
`StorageError`s that name the URL, the cause and the fix, and never the secret key.
"""
import contextlib
import functools
import hashlib
import os
import signal
import tempfile

import fsspec

from pipeline.errors import UserError

READ_BLOCK_SIZE = 8 * 2**20  # s3 readahead block: tar streams crawl without buffering
WRITE_BLOCK_SIZE = 64 * 2**20  # s3 multipart part size: larger writes upload in parts
# 4 retries, jittered exponential backoff (~7 s in all, 15 s at most): rides out resets,
# stalls and 5xx replies (tests/integration/test_faults_s3.py), yet an endpoint that refuses every
# connection still fails a start-up within seconds. s3fs retries some errors on top.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 60,
             "retries": {"max_attempts": 4, "mode": "standard"}}
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


class StorageError(UserError):
    """A storage operation failed for a reason the user must fix (credentials, bucket,
    endpoint). The message is one line and holds no secret."""


class RefusedURL(StorageError, ValueError):
    """A URL or file name this project never opens (another scheme, a shell command)."""


def is_s3(url: str) -> bool:
    return check_url(url) == "s3"


def check_url(url: str) -> str:
    """'local' or 's3'; every other URL scheme, webdataset's shell-running `pipe:`
    among them, is refused here, the one place that decides."""
    url = str(url)
    if url.startswith("s3://"):
        return "s3"
    if url.startswith("file://") or "://" not in url and not url.startswith("pipe:"):
        return "local"
    raise RefusedURL(f"unsupported storage URL {url!r}: only local paths, file:// and "
                     "s3:// are accepted (pipe: URLs run a shell and are refused)")


def _local(url: str) -> str:
    url = str(url)
    return url[len("file://"):] if url.startswith("file://") else url


def _s3_key(url: str) -> str:
    return url[len("s3://"):]


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `url` (one S3 client per environment and process)."""
    if not is_s3(url):
        return fsspec.filesystem("file")
    secrets = "".join(os.environ.get(v, "") for v in _SECRET_VARS)
    env = (_endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"),
           os.environ.get("AWS_DEFAULT_REGION"), hashlib.sha256(secrets.encode()).hexdigest())
    # keyed by pid too: an aiohttp session does not survive fork into a worker process
    return _s3_filesystem(env, os.getpid())


@functools.lru_cache(maxsize=8)
def _s3_filesystem(env: tuple, pid: int) -> fsspec.AbstractFileSystem:
    import s3fs
    endpoint = env[0]
    # explicit endpoint_url: older botocore ignores AWS_ENDPOINT_URL; our own cache
    # (keyed by the env) replaces s3fs's instance cache, which ignores credential changes
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint} if endpoint else {},
        config_kwargs=S3_CONFIG, profile=env[2], use_listings_cache=False,
        skip_instance_cache=True)


def clear_cache() -> None:
    """Forget S3 clients, e.g. after the endpoint or credentials in the env changed."""
    import s3fs
    _s3_filesystem.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()


def _scrub(text: str) -> str:
    for var in _SECRET_VARS:
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "***")
    return " ".join(text.split())


def _explain(url: str, err: Exception) -> str | None:
    """A one-line cause and fix for an S3 failure, or None if it is a plain missing key."""
    import botocore.exceptions as bex
    where = f"endpoint {_endpoint()}" if _endpoint() else "AWS S3"
    cause = _scrub(str(err) or type(err).__name__)
    if isinstance(err, bex.NoCredentialsError):
        return (f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(err, PermissionError):
        return (f"{url}: access denied by {where} ({cause}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket's permissions")
    if isinstance(err, FileNotFoundError):
        if "bucket" not in cause.lower():
            return None
        return f"{url}: bucket does not exist on {where} ({cause}); create it or fix the URL"
    if isinstance(err, (bex.EndpointConnectionError, bex.ConnectTimeoutError,
                        bex.ReadTimeoutError, ConnectionError, TimeoutError)):
        return (f"{url}: cannot reach {where} ({cause}); check AWS_ENDPOINT_URL and "
                "the network")
    return f"{url}: S3 request failed on {where} ({type(err).__name__}: {cause})"


@contextlib.contextmanager
def _s3_errors(url: str):
    """Turn S3 failures into one-line StorageErrors; local errors pass through."""
    if not is_s3(url):
        yield
        return
    import botocore.exceptions as bex
    try:
        yield
    except (OSError, bex.BotoCoreError) as err:
        message = _explain(url, err)
        if message is None:
            raise
        raise StorageError(message) from None  # `from None`: no traceback to leak into


def join(base: str, *parts: str) -> str:
    """`base/part/part`, for local paths and URLs alike."""
    check_url(base)
    return "/".join([str(base).rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")])


def inside(folder: str, name: str) -> str:
    """`folder/name` for a name read from a file (a manifest's shard name): only a path
    relative to the folder and inside it; a URL, a `pipe:` command, an absolute path or a
    `..` is refused with RefusedURL."""
    if not name or ":" in name or name.startswith(("/", "\\")) or \
            ".." in name.replace("\\", "/").split("/"):
        raise RefusedURL(f"refusing {name!r} as a file of {folder}: only a path relative to "
                         "that folder is accepted (pipe: names run a shell)")
    return join(folder, name)


def contains(folder: str, url: str) -> bool:
    """Whether `url` is `folder` or lies below it (local paths resolved, links included)."""
    if is_s3(folder) != is_s3(url):
        return False
    if is_s3(folder):
        outer, inner = folder.rstrip("/"), url.rstrip("/")
        return inner == outer or inner.startswith(outer + "/")
    outer, inner = os.path.realpath(_local(folder)), os.path.realpath(_local(url))
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def exists(url: str) -> bool:
    with _s3_errors(url):
        if is_s3(url):
            return filesystem(url).exists(_s3_key(url))
        return os.path.exists(_local(url))


def list_sizes(url: str, suffix: str | None = None, recursive: bool = True) -> dict[str, int]:
    """{file URL: size in bytes} for every file below a folder or prefix, sorted by URL,
    URLs of the same kind as `url`; only names ending with `suffix` if given. One
    listing gives the sizes, no per-file request. A missing folder lists empty."""
    with _s3_errors(url):
        if is_s3(url):
            prefix = _s3_key(url).rstrip("/") + "/"
            fs = filesystem(url)
            if recursive:
                infos = fs.find(prefix, detail=True).values()
            else:
                try:
                    infos = [i for i in fs.ls(prefix, detail=True) if i["type"] == "file"]
                except FileNotFoundError as err:
                    if "bucket" in str(err).lower():
                        raise
                    infos = []
            found = {"s3://" + i["name"]: i["size"] for i in infos}
        else:
            found = _local_sizes(_local(url), recursive)
            if str(url).startswith("file://"):
                found = {"file://" + f: n for f, n in found.items()}
    return {f: found[f] for f in sorted(found) if suffix is None or f.endswith(suffix)}


def _local_sizes(root: str, recursive: bool) -> dict[str, int]:
    sizes = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(root):
            if entry.is_dir():
                if recursive:
                    sizes.update(_local_sizes(entry.path, recursive))
            elif entry.is_file():
                sizes[entry.path] = entry.stat().st_size
    return sizes


def list_files(url: str, suffix: str | None = None) -> list[str]:
    """Every file below a folder or prefix (recursive), as sorted URLs; see list_sizes."""
    return list(list_sizes(url, suffix))


def open_read(url: str, block_size: int = READ_BLOCK_SIZE):
    """A buffered binary file for reading (s3: readahead cache, never unbuffered)."""
    with _s3_errors(url):
        if is_s3(url):
            return filesystem(url).open(_s3_key(url), "rb", block_size=block_size,
                                        cache_type="readahead")
        return open(_local(url), "rb", buffering=min(block_size, 2**20))


def read_bytes(url: str) -> bytes:
    with _s3_errors(url):
        if is_s3(url):
            return filesystem(url).cat_file(_s3_key(url))
        with open(_local(url), "rb") as f:
            return f.read()


def read_many(urls: list[str]) -> dict[str, bytes | OSError]:
    """{url: bytes, or the OSError reading it raised}; on S3 the reads run concurrently
    (one request per object costs ~10 ms each when made one after another)."""
    s3_urls = [u for u in urls if is_s3(u)]
    found = {}
    if s3_urls:
        with _s3_errors(s3_urls[0]):
            fetched = filesystem(s3_urls[0]).cat([_s3_key(u) for u in s3_urls], on_error="return")
        found = {u: fetched[_s3_key(u)] for u in s3_urls}
    for url in urls:
        if not is_s3(url):
            try:
                found[url] = read_bytes(url)
            except OSError as err:
                found[url] = err
    return found


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically (see atomic_write)."""
    with atomic_write(url) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_write(url: str):
    """Yield a binary file; `url` appears, complete, only if the block succeeds.

    Local: a temp file in the same folder, fsync, os.replace; removed on exception. The
    file gets the permissions the umask gives (a dataset or run folder shared on a
    cluster must be readable by the team, not only by its owner).
    S3: the object becomes visible when its (multipart) upload completes at the end;
    on exception the upload is aborted and nothing is left behind.
    """
    if is_s3(url):
        with _s3_errors(url):
            f = filesystem(url).open(_s3_key(url), "wb", block_size=WRITE_BLOCK_SIZE)
        try:
            yield f
        except BaseException:
            f.discard()  # aborts a multipart upload; a small file was never sent
            f.closed = True  # else fsspec's __del__ would commit the partial buffer
            raise
        with _s3_errors(url):
            f.close()
        return
    path = _local(url)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a SIGTERM/SIGINT handler that raises (shard.py's workers, Ctrl-C) must not land after
    # mkstemp created the file but before the `try` that removes it: held until inside
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    except BaseException:  # nothing was created (a full disk, a read-only folder)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: give what open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it, and
    setting it to read it races with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def put(local_path: str, url: str) -> None:
    """Copy a local file to `url` atomically."""
    with open(local_path, "rb") as src, atomic_write(url) as dst:
        while chunk := src.read(READ_BLOCK_SIZE):
            dst.write(chunk)


def remove(url: str) -> None:
    """Delete one file; a missing file is not an error."""
    with _s3_errors(url):
        if is_s3(url):
            with contextlib.suppress(FileNotFoundError):
                filesystem(url).rm_file(_s3_key(url))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(_local(url))


def check_writable(url: str) -> None:
    """Raise a StorageError now, not hours later, if objects cannot be written below `url`
    (an s3:// prefix): a small probe object is written there, then removed."""
    probe = join(url, ".write-probe")
    write_bytes(probe, b"pix2pix-at-scale checks it may write here\n")
    # a prefix that takes writes but refuses deletes still works: mirrors never delete
    with contextlib.suppress(StorageError):
        remove(probe)


def makedirs(url: str) -> None:
    """Create a local folder (and parents); a no-op on S3, where prefixes need none."""
    if not is_s3(url):
        os.makedirs(_local(url), exist_ok=True)
