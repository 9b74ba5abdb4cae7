"""Download of the default pretrained weights, timm ``resnet50.tv2_in1k``, from the HF hub.

Plain urllib, no hub client: one public file, fetched once into the cache. The usual hub
environment variables are honoured: ``HF_ENDPOINT`` (base URL of a mirror) and
``HF_HUB_OFFLINE`` (truthy: do not touch the network at all).

The file is checked against the SHA-256 the hub publishes for it (the ``X-Linked-Etag``
header of its resolve URL, which is the Git LFS object id) as it is downloaded, and the
checksum is kept beside it (``<file>.sha256``); the cached file is checked against it again
whenever it is used. A file that fails is removed and fetched again, or, where the network
may not be used, refused with the reason: never served as pretrained.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import IO, BinaryIO

from filelock import FileLock

from framecast_server.model.weights import WeightsError, load_safetensors

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REPO = "timm/resnet50.tv2_in1k"
DEFAULT_REVISION = "main"
DEFAULT_FILENAME = "model.safetensors"
#: Name of the downloaded file inside the weights cache directory.
CACHED_FILENAME = "resnet50.tv2_in1k.safetensors"
#: The published SHA-256 of the cached file, hex, kept beside it.
CHECKSUM_SUFFIX = ".sha256"
#: Seconds to wait to connect, and for each read: short, so an offline machine fails fast
#: (a stalled read fails just as fast, which beats hanging a server start).
DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20
_TRUTHY = {"1", "true", "yes", "on"}


class WeightsUnavailableError(RuntimeError):
    """The default weights could not be obtained; the message says why."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network access (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def default_weights_url(endpoint: str | None = None) -> str:
    """URL of the default weights on ``endpoint``, else ``$HF_ENDPOINT``, else the public hub."""
    base = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return f"{base.rstrip('/')}/{DEFAULT_REPO}/resolve/{DEFAULT_REVISION}/{DEFAULT_FILENAME}"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_cached_weights(weights_dir: Path) -> tuple[Path | None, str]:
    """The cached default weights if they match their published checksum, else why not.

    Returns ``(path, "")`` for a file that checks out, ``(None, reason)`` otherwise. A file
    that fails (no recorded checksum, or a different one) is removed, so the next download
    replaces it.
    """
    path = weights_dir / CACHED_FILENAME
    recorded = path.with_name(path.name + CHECKSUM_SUFFIX)
    if not path.is_file():
        return None, "the weights are not cached"
    try:
        expected = recorded.read_text().strip()
    except OSError:
        expected = ""
    actual = file_sha256(path)
    if _SHA256.fullmatch(expected) and actual == expected:
        return path, ""
    reason = (
        f"the cached weights {path} fail their published checksum "
        f"(sha256 {actual[:12]}..., published {expected[:12] or 'none recorded'}...)"
    )
    logger.warning("%s: removed", reason)
    for stale in (path, recorded):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return None, reason


def cached_default_weights(weights_dir: Path) -> Path | None:
    """The already-downloaded default weights in ``weights_dir`` that pass their checksum."""
    return check_cached_weights(weights_dir)[0]


def download_default_weights(
    weights_dir: Path, *, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Path:
    """Return the path of the default weights in ``weights_dir``, downloading them if needed.

    The file is streamed into a temporary file next to its destination, checked to load as
    ResNet-50 weights, then published with an atomic rename, so a reader never sees a partial
    or wrong file; a file lock keeps concurrent processes from downloading twice. Already-cached
    weights are returned without any network access.

    Raises WeightsUnavailableError (offline mode, HTTP error, unreachable or slow endpoint,
    invalid content), with the reason in the message.
    """
    cached, why = check_cached_weights(weights_dir)
    if cached is not None:
        return cached
    if hub_offline():
        raise WeightsUnavailableError(f"HF_HUB_OFFLINE is set and {why}")
    url = default_weights_url(endpoint)
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(weights_dir / f"{CACHED_FILENAME}.lock")):
            # Another process may have finished the download while this one waited.
            cached = cached_default_weights(weights_dir)
            if cached is not None:
                return cached
            return _download(url, weights_dir / CACHED_FILENAME, timeout)
    except OSError as exc:
        raise WeightsUnavailableError(f"cannot write to {weights_dir}: {exc}") from exc


def _download(url: str, dest: Path, timeout: float) -> Path:
    logger.info("downloading pretrained ResNet-50 weights from %s", url)
    start = time.monotonic()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            size, actual, published = _fetch(url, out, timeout)
        if published is None:
            raise WeightsUnavailableError(
                f"{url} published no SHA-256 (X-Linked-Etag) to check the weights against"
            )
        if actual != published:
            raise WeightsUnavailableError(
                f"the weights from {url} fail their published checksum "
                f"(sha256 {actual}, published {published})"
            )
        try:
            load_safetensors(tmp)
        except WeightsError as exc:
            raise WeightsUnavailableError(
                f"{url} did not serve valid ResNet-50 weights: {exc}"
            ) from exc
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the cache from other users
        _write_atomically(dest.with_name(dest.name + CHECKSUM_SUFFIX), f"{published}\n")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info(
        "downloaded %.1f MB of weights to %s in %.1f s", size / 1e6, dest, time.monotonic() - start
    )
    return dest


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _published_sha256(headers: Message) -> str | None:
    """The SHA-256 a hub response vouches for: X-Linked-Etag (LFS files), else a 64-hex ETag."""
    for name in ("X-Linked-Etag", "ETag"):
        value = (headers.get(name) or "").strip().removeprefix("W/").strip('"').lower()
        if _SHA256.fullmatch(value):
            return value
    return None


class _ChecksumRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects, noting the checksum the hub's redirect to its CDN carries."""

    def __init__(self) -> None:
        super().__init__()
        self.published: str | None = None

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        self.published = self.published or _published_sha256(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, out: BinaryIO, timeout: float) -> tuple[int, str, str | None]:
    """Stream ``url`` into ``out``; return the byte count, its SHA-256 and the published one."""
    request = urllib.request.Request(url, headers={"User-Agent": "framecast-server"})
    recorder = _ChecksumRecorder()
    opener = urllib.request.build_opener(recorder)
    digest = hashlib.sha256()
    try:
        # The hub answers with a redirect to its CDN, carrying the checksum; followed here.
        with opener.open(request, timeout=timeout) as response:
            published = recorder.published or _published_sha256(response.headers)
            expected = response.headers.get("Content-Length")
            size = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as exc:
        raise WeightsUnavailableError(f"HTTP {exc.code} {exc.reason} from {url}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise WeightsUnavailableError(f"timed out after {timeout:g} s reaching {url}") from exc
        raise WeightsUnavailableError(f"cannot reach {url}: {reason}") from exc
    except TimeoutError as exc:
        raise WeightsUnavailableError(f"timed out after {timeout:g} s downloading {url}") from exc
    except (OSError, http.client.HTTPException) as exc:
        # Connection reset or closed mid-stream (IncompleteRead), malformed responses.
        raise WeightsUnavailableError(f"download from {url} failed: {exc!r}") from exc
    if expected is not None and expected.isdigit() and int(expected) != size:
        raise WeightsUnavailableError(
            f"download from {url} was cut short: {size} of {expected} bytes"
        )
    return size, digest.hexdigest(), published
