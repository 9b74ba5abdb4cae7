"""Download of the default pretrained weights, timm ``resnet50.tv2_in1k``, from the HF hub.

Plain urllib, no hub client: one public file, fetched once into the cache. The usual hub
environment variables are honoured: ``HF_ENDPOINT`` (base URL of a mirror) and
``HF_HUB_OFFLINE`` (truthy: do not touch the network at all).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from framecast_server.model.weights import WeightsError, load_safetensors

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REPO = "timm/resnet50.tv2_in1k"
DEFAULT_REVISION = "main"
DEFAULT_FILENAME = "model.safetensors"
#: Name of the downloaded file inside the weights cache directory.
CACHED_FILENAME = "resnet50.tv2_in1k.safetensors"
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


def cached_default_weights(weights_dir: Path) -> Path | None:
    """The already-downloaded default weights in ``weights_dir``, or None."""
    path = weights_dir / CACHED_FILENAME
    return path if path.is_file() else None


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
    cached = cached_default_weights(weights_dir)
    if cached is not None:
        return cached
    if hub_offline():
        raise WeightsUnavailableError("HF_HUB_OFFLINE is set and the weights are not cached")
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
            size = _fetch(url, out, timeout)
        try:
            load_safetensors(tmp)
        except WeightsError as exc:
            raise WeightsUnavailableError(
                f"{url} did not serve valid ResNet-50 weights: {exc}"
            ) from exc
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info(
        "downloaded %.1f MB of weights to %s in %.1f s", size / 1e6, dest, time.monotonic() - start
    )
    return dest


def _fetch(url: str, out: BinaryIO, timeout: float) -> int:
    """Stream ``url`` into the binary file ``out``; return the byte count."""
    request = urllib.request.Request(url, headers={"User-Agent": "framecast-server"})
    try:
        # urllib follows the hub's redirect to its CDN by itself.
        with urllib.request.urlopen(request, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            size = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
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
    return size
