"""Get a bundle's files: from an https:// URL, a local .tar.gz (path or file://), or a directory.

Every source gives the same thing, a dict of file name -> bytes, held in memory: an archive is checked
member by member before any member is read, and nothing is ever extracted to disk. Validation of the
contents is model.py's job.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from agent import download
from agent.bundle.model import KNOWN_FILES
from agent.config import BundleConfig
from agent.redact import register_secret
from agent.retry import Backoff, RetryableError, call_with_retries

log = logging.getLogger("agent.bundle.source")

MAX_MEMBERS = 32  # a bundle has at most 9 files; anything near this is not a bundle
UNPACKED_FACTOR = 4  # an archive may unpack to at most this many times bundle.max_size
RETRY_TRIES = 3
RETRY_BACKOFF = (0.5, 10.0)  # initial, max seconds


class FetchError(Exception):
    """The bundle could not be fetched (after retries, when retrying made sense)."""


@dataclass(frozen=True)
class Validators:
    """HTTP cache validators of the last bundle fetched, sent back so an unchanged bundle is not
    downloaded again."""
    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class Fetched:
    files: dict[str, bytes]
    source: str  # where it came from, without credentials
    size: int  # bytes read (archive or sum of files)
    validators: Validators = Validators()


@dataclass(frozen=True)
class NotModified:
    """The server says the bundle is the one we have (HTTP 304)."""
    source: str
    validators: Validators


def display_source(source: str) -> str:
    """The source without user:password or query string, for logs and status."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return source


def fetch(cfg: BundleConfig, previous: Validators | None = None, *,
          sleep: Callable[[float], None] = time.sleep, tries: int = RETRY_TRIES) -> Fetched | NotModified:
    """Fetch the bundle named by cfg.source. Raises FetchError."""
    source = cfg.source.strip()
    if source == "kubernetes":
        raise FetchError("bundle.source: kubernetes is built from the cluster by the running agent (`mesh-agent "
                         "run`), not fetched; here give an https:// URL, an archive or a directory")
    scheme = urlsplit(source).scheme
    if scheme in ("http", "https"):
        return fetch_https(cfg, previous, sleep=sleep, tries=tries)
    if scheme == "file":
        path = Path(unquote(urlsplit(source).path))
    elif scheme == "" or len(scheme) == 1:  # a plain path (or a Windows drive letter, refused below)
        path = Path(source)
    else:
        raise FetchError(f"bundle source {source!r}: unsupported scheme {scheme!r} "
                         "(use https://, file://, a path to a .tar.gz, or a directory)")
    return read_local(path, cfg.max_size)


# --- local sources --------------------------------------------------------------------------------

def read_local(path: Path, max_size: int) -> Fetched:
    try:
        st = path.stat()
    except OSError as exc:
        raise FetchError(f"bundle source {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        files = read_directory(path, max_size)
        fetched = Fetched(files, str(path), sum(len(b) for b in files.values()))
    elif stat.S_ISREG(st.st_mode):
        if st.st_size > max_size:
            raise FetchError(f"bundle source {path}: {st.st_size} bytes is larger than bundle.max_size "
                             f"({max_size})")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FetchError(f"bundle source {path}: {exc.strerror}") from None
        fetched = Fetched(read_archive(data, max_size, str(path)), str(path), len(data))
    else:
        raise FetchError(f"bundle source {path}: neither a directory nor a regular file")
    log.info("read bundle from %s (%d bytes)", fetched.source, fetched.size)
    _register(fetched.files)
    return fetched


def read_directory(path: Path, max_size: int) -> dict[str, bytes]:
    """Every regular file in the directory (istioctl's output directory as it is). Links, devices and
    subdirectories are refused, not followed; unknown names are left to the model to report."""
    problems: list[str] = []
    files: dict[str, bytes] = {}
    total = 0
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        raise FetchError(f"bundle source {path}: {exc.strerror}") from None
    if len(entries) > MAX_MEMBERS:
        raise FetchError(f"bundle source {path}: {len(entries)} entries, more than {MAX_MEMBERS}")
    for e in entries:
        if e.is_symlink():
            problems.append(f"{e.name}: a symbolic link; the bundle must hold regular files")
            continue
        if not e.is_file(follow_symlinks=False):
            problems.append(f"{e.name}: not a regular file")
            continue
        try:
            # O_NOFOLLOW: the entry could have been swapped for a link since scandir looked.
            fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = f.read(max_size + 1)
        except OSError as exc:
            problems.append(f"{e.name}: cannot read: {exc.strerror}")
            continue
        total += len(data)
        if len(data) > max_size or total > max_size:
            problems.append(f"{e.name}: the bundle is larger than bundle.max_size ({max_size} bytes)")
            break
        files[e.name] = data
    if problems:
        raise FetchError(f"bundle source {path}:\n" + "\n".join(f"  {p}" for p in problems))
    return files


def _gunzip(data: bytes, limit: int, where: str) -> bytes:
    """Decompress gzip (all members) into at most `limit` bytes, so a small archive that unpacks to
    gigabytes is refused after reading `limit` bytes, not after filling memory."""
    out = bytearray()
    rest = data
    while rest:
        d = zlib.decompressobj(wbits=31)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise FetchError(f"{where}: unpacks to more than {limit} bytes")
            if not d.eof:
                if d.unconsumed_tail:
                    raise FetchError(f"{where}: unpacks to more than {limit} bytes")
                raise FetchError(f"{where}: truncated gzip data")
        except zlib.error as exc:
            raise FetchError(f"{where}: not a valid gzip file ({exc})") from None
        rest = d.unused_data
        if rest.strip(b"\0") == b"":
            break
    return bytes(out)


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def read_archive(data: bytes, max_size: int, where: str = "archive") -> dict[str, bytes]:
    """The files of a .tar.gz, checked before any byte of a member is read.

    Refused: absolute names, `..`, links, devices, FIFOs, names the bundle does not know, more than
    MAX_MEMBERS members, a member or a total larger than allowed. A single top-level directory (as in
    `tar czf b.tgz vm/`) is accepted and stripped."""
    if data[:2] != b"\x1f\x8b":
        raise FetchError(f"{where}: not a .tar.gz (no gzip header)")
    raw = _gunzip(data, max_size * UNPACKED_FACTOR, where)
    try:
        tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")  # noqa: SIM115 (in memory, read below)
        members = []
        for m in tf:  # reads headers only
            members.append(m)
            if len(members) > MAX_MEMBERS:
                raise FetchError(f"{where}: more than {MAX_MEMBERS} members")
    except tarfile.TarError as exc:
        raise FetchError(f"{where}: not a valid tar archive ({exc})") from None

    problems: list[str] = []
    files_ = [m for m in members if m.isfile()]
    tops = {_member_name(m.name).split("/")[0] for m in files_ if "/" in _member_name(m.name)}
    prefix = ""
    if len(tops) == 1 and all("/" in _member_name(m.name) for m in files_):
        prefix = tops.pop() + "/"
    seen: set[str] = set()
    total = 0
    chosen: list[tuple[str, tarfile.TarInfo]] = []
    for m in members:
        name = m.name
        norm = _member_name(name)
        if name.startswith("/") or os.path.isabs(name):
            problems.append(f"{name}: absolute path")
            continue
        if ".." in name.split("/"):
            problems.append(f"{name}: path with '..'")
            continue
        if m.issym() or m.islnk():
            problems.append(f"{name}: a {'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}")
            continue
        if m.isdir():
            if norm in ("", ".") or norm + "/" == prefix:
                continue
            problems.append(f"{name}: unexpected directory")
            continue
        if not m.isfile():
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "FIFO"}.get(m.type, f"entry of type {m.type!r}")
            problems.append(f"{name}: a {kind}")
            continue
        short = norm[len(prefix):] if prefix and norm.startswith(prefix) else norm
        if "/" in short or short not in KNOWN_FILES:
            problems.append(f"{name}: unknown file; a bundle holds only {', '.join(KNOWN_FILES)}")
            continue
        if short in seen:
            problems.append(f"{name}: {short} appears twice")
            continue
        seen.add(short)
        if m.size > max_size:
            problems.append(f"{name}: {m.size} bytes, larger than bundle.max_size ({max_size})")
            continue
        total += m.size
        chosen.append((short, m))
    if total > max_size:
        problems.append(f"members total {total} bytes, larger than bundle.max_size ({max_size})")
    if problems:
        raise FetchError(f"{where}: unsafe or invalid archive:\n" + "\n".join(f"  {p}" for p in problems))
    out: dict[str, bytes] = {}
    for short, m in chosen:
        f = tf.extractfile(m)  # a reader over the in-memory tar; nothing touches the disk
        assert f is not None
        out[short] = f.read()
    return out


# --- https ----------------------------------------------------------------------------------------

def _read_secret_file(path: str, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise FetchError(f"cannot read {what} {path}: {getattr(exc, 'strerror', exc)}") from None
    register_secret(value)
    return value


def fetch_https(cfg: BundleConfig, previous: Validators | None = None, *,
                sleep: Callable[[float], None] = time.sleep,
                tries: int = RETRY_TRIES) -> Fetched | NotModified:
    import requests

    url = cfg.source.strip()
    shown = display_source(url)
    if url.startswith("http://") and not cfg.allow_insecure:
        raise FetchError(f"{shown}: http:// is refused; use https:// or set bundle.allow_insecure: true")
    headers = {"Accept": "application/gzip, application/x-gzip, application/octet-stream",
               "User-Agent": "mesh-agent"}
    if cfg.token_file:
        headers["Authorization"] = "Bearer " + _read_secret_file(cfg.token_file, "bundle.token_file")
    if previous is not None:
        if previous.etag:
            headers["If-None-Match"] = previous.etag
        if previous.last_modified:
            headers["If-Modified-Since"] = previous.last_modified
    verify: str | bool = cfg.ca_file or True
    cert = (cfg.client_cert, cfg.client_key) if cfg.client_cert and cfg.client_key else None
    timeout = (cfg.connect_timeout, cfg.read_timeout)
    max_size = cfg.max_size
    deadline = download.Deadline(cfg.fetch_deadline)
    too_slow = FetchError(f"{shown}: not fetched within bundle.fetch_deadline ({cfg.fetch_deadline:g}s); "
                          "the server is too slow or trickles its answer")

    def once() -> Fetched | NotModified:
        if deadline.expired:
            raise too_slow
        try:
            return attempt()
        except Exception:
            if deadline.expired:  # the deadline cut the connection: that, not the broken read, is why
                raise too_slow from None
            raise

    def attempt() -> Fetched | NotModified:
        started = time.monotonic()
        try:
            with download.session(deadline) as session:
                resp = session.get(url, headers=headers, verify=verify, cert=cert, timeout=timeout,
                                   stream=True, allow_redirects=False)
                with resp:
                    return handle(resp, started)
        except requests.exceptions.SSLError as exc:
            raise FetchError(f"{shown}: TLS verification failed ({_short(exc)}); "
                             "check bundle.ca_file") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise RetryableError(f"{shown}: {_short(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise RetryableError(f"{shown}: {_short(exc)}") from None

    def handle(resp: requests.Response, started: float) -> Fetched | NotModified:
        v = Validators(resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
        if resp.status_code == 304:
            log.info("bundle at %s not modified", shown)
            return NotModified(shown, previous or v)
        if resp.status_code in (408, 429) or resp.status_code >= 500:
            raise RetryableError(f"{shown}: HTTP {resp.status_code} {resp.reason}",
                                 _retry_after(resp.headers.get("Retry-After")))
        if resp.status_code in (401, 403):
            raise FetchError(f"{shown}: HTTP {resp.status_code} {resp.reason}: the server refused our "
                             "credentials (bundle.token_file / client_cert)")
        if 300 <= resp.status_code < 400:
            where = resp.headers.get("Location")
            raise FetchError(f"{shown}: HTTP {resp.status_code} redirect to {where!r}; "
                             "redirects are not followed, set bundle.source to the final URL")
        if resp.status_code != 200:
            raise FetchError(f"{shown}: HTTP {resp.status_code} {resp.reason}")
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_size:
            raise FetchError(f"{shown}: {length} bytes is larger than bundle.max_size ({max_size})")
        body = bytearray()
        try:
            for chunk in download.body_chunks(resp, max_size):
                body += chunk
        except download.DownloadTooLarge:
            raise FetchError(f"{shown}: the body is larger than bundle.max_size ({max_size})") from None
        if deadline.expired:
            raise too_slow
        if length is not None and length.isdigit() and len(body) != int(length):
            raise RetryableError(f"{shown}: truncated body ({len(body)} of {length} bytes)")
        files = read_archive(bytes(body), max_size, shown)
        log.info("fetched bundle from %s (%d bytes, %.0f ms)", shown, len(body),
                 (time.monotonic() - started) * 1000)
        _register(files)
        return Fetched(files, shown, len(body), v)

    def on_retry(attempt: int, exc: Exception, delay: float) -> None:
        log.warning("bundle fetch attempt %d failed: %s; retrying in %.1fs", attempt, exc, delay)

    def pause(seconds: float) -> None:  # a retry never waits past the deadline
        sleep(min(seconds, deadline.remaining()))

    try:
        with deadline:
            return call_with_retries(once, Backoff(*RETRY_BACKOFF), tries, sleep=pause, on_retry=on_retry)
    except RetryableError as exc:
        raise FetchError(str(exc)) from None


def _short(exc: Exception) -> str:
    """A one-line reason out of requests' nested exception text."""
    text = str(exc)
    for marker in ("certificate verify failed", "Read timed out", "timed out", "Connection refused",
                   "IncompleteRead", "Connection broken", "Name or service not known"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _register(files: dict[str, bytes]) -> None:
    """The tokens are credentials: mask them wherever they might be logged."""
    token = files.get("istio-token")
    if token:
        register_secret(token.decode("utf-8", "replace"))
    kubeconfig = files.get("kubeconfig")
    if kubeconfig:
        from agent.safeload import LoadError, load_yaml

        try:
            doc = load_yaml(kubeconfig.decode("utf-8", "replace"), "kubeconfig")
        except LoadError:
            return  # the bundle check reports it
        users = doc.get("users") if isinstance(doc, dict) else None
        for u in users if isinstance(users, list) else []:
            user = u.get("user") if isinstance(u, dict) else None
            if isinstance(user, dict) and isinstance(user.get("token"), str):
                register_secret(user["token"])
