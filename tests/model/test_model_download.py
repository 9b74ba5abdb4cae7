"""Default-weights download against a real HTTP server on loopback laid out like the hub."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from framecast_server.model import (
    WeightsUnavailableError,
    default_weights_url,
    download_default_weights,
    load_safetensors,
)
from framecast_server.model.download import CACHED_FILENAME, CHECKSUM_SUFFIX

from .model_helpers import HUB_PATH, FakeHub


@pytest.fixture(scope="module")
def weights_bytes(weights_file: Path) -> bytes:
    return weights_file.read_bytes()


def leftovers(directory: Path) -> list[str]:
    """Files other than the lock: a failed download must not leave partial files behind."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def test_url_layout_and_endpoint_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT")
    assert default_weights_url() == (
        "https://huggingface.co/timm/resnet50.tv2_in1k/resolve/main/model.safetensors"
    )
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/hf/")
    assert default_weights_url() == (
        "http://mirror.example/hf/timm/resnet50.tv2_in1k/resolve/main/model.safetensors"
    )
    assert default_weights_url("http://other") == f"http://other{HUB_PATH}"


def test_download_then_cached(fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path) -> None:
    fake_hub.serve_file(HUB_PATH, weights_bytes)
    weights_dir = tmp_path / "weights"
    path = download_default_weights(weights_dir, endpoint=fake_hub.url)
    assert path == weights_dir / CACHED_FILENAME
    assert path.read_bytes() == weights_bytes
    assert len(load_safetensors(path)) == 267
    assert fake_hub.requests == [HUB_PATH]
    assert leftovers(weights_dir) == [CACHED_FILENAME, CACHED_FILENAME + CHECKSUM_SUFFIX]
    recorded = (weights_dir / (CACHED_FILENAME + CHECKSUM_SUFFIX)).read_text().strip()
    assert recorded == hashlib.sha256(weights_bytes).hexdigest()

    again = download_default_weights(weights_dir, endpoint=fake_hub.url)
    assert again == path
    assert fake_hub.requests == [HUB_PATH]  # no second request


def test_hf_endpoint_and_redirects_are_followed(
    fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hub redirects resolve URLs to its CDN; HF_ENDPOINT picks the server.
    # The checksum rides on the redirect, as on the hub; the CDN sends none of its own.
    fake_hub.redirect(HUB_PATH, "/cdn/blob", checksum=hashlib.sha256(weights_bytes).hexdigest())
    fake_hub.serve_file("/cdn/blob", weights_bytes, checksum=None)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    path = download_default_weights(tmp_path)
    assert path.read_bytes() == weights_bytes
    assert fake_hub.requests == [HUB_PATH, "/cdn/blob"]


def test_not_found(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"HTTP 404 .* from http://127\.0\.0\.1"):
        download_default_weights(tmp_path, endpoint=fake_hub.url)
    assert fake_hub.requests == [HUB_PATH]
    assert leftovers(tmp_path) == []


def test_unreachable_endpoint_fails_fast(closed_port_url: str, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"cannot reach http://127\.0\.0\.1"):
        download_default_weights(tmp_path, endpoint=closed_port_url)
    assert time.monotonic() - start < 5.0
    assert leftovers(tmp_path) == []


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel backlog does) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_silent_endpoint_times_out(silent_server: str, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"timed out after 0\.5 s"):
        download_default_weights(tmp_path, endpoint=silent_server, timeout=0.5)
    assert time.monotonic() - start < 5.0
    assert leftovers(tmp_path) == []


def test_invalid_content_is_not_published(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.serve_file(HUB_PATH, b"<html>login required</html>")
    with pytest.raises(WeightsUnavailableError, match="did not serve valid ResNet-50 weights"):
        download_default_weights(tmp_path, endpoint=fake_hub.url)
    assert leftovers(tmp_path) == []


def test_truncated_download_is_not_published(
    fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path
) -> None:
    fake_hub.truncated(HUB_PATH, weights_bytes[:100_000], claimed=len(weights_bytes))
    with pytest.raises(WeightsUnavailableError, match=r"cut short: 100000 of \d+ bytes"):
        download_default_weights(tmp_path, endpoint=fake_hub.url)
    assert leftovers(tmp_path) == []


def test_offline_mode_makes_no_request(
    fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.serve_file(HUB_PATH, weights_bytes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        download_default_weights(tmp_path, endpoint=fake_hub.url)
    assert fake_hub.requests == []
    assert leftovers(tmp_path) == []

    # Offline mode still serves what is already cached.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    path = download_default_weights(tmp_path, endpoint=fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert download_default_weights(tmp_path, endpoint=fake_hub.url) == path
    assert fake_hub.requests == [HUB_PATH]


def test_weights_that_fail_the_published_checksum_are_not_published(
    fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path
) -> None:
    fake_hub.serve_file(HUB_PATH, weights_bytes, checksum="0" * 64)
    with pytest.raises(WeightsUnavailableError, match="fail their published checksum"):
        download_default_weights(tmp_path, endpoint=fake_hub.url)
    assert leftovers(tmp_path) == []


def test_weights_without_a_published_checksum_are_refused(
    fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path
) -> None:
    fake_hub.serve_file(HUB_PATH, weights_bytes, checksum=None)
    with pytest.raises(WeightsUnavailableError, match="published no SHA-256"):
        download_default_weights(tmp_path, endpoint=fake_hub.url)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["flipped-byte", "checksum-lost"])
def test_cached_weights_that_fail_their_checksum_are_fetched_again(
    damage: str, fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path
) -> None:
    fake_hub.serve_file(HUB_PATH, weights_bytes)
    path = download_default_weights(tmp_path, endpoint=fake_hub.url)
    if damage == "flipped-byte":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # still loads as safetensors: only the checksum can tell
        path.write_bytes(bytes(data))
    else:
        (tmp_path / (CACHED_FILENAME + CHECKSUM_SUFFIX)).unlink()
    assert download_default_weights(tmp_path, endpoint=fake_hub.url) == path
    assert fake_hub.requests == [HUB_PATH, HUB_PATH]
    assert path.read_bytes() == weights_bytes


def test_cached_weights_that_fail_offline_are_refused_with_the_reason(
    fake_hub: FakeHub, weights_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.serve_file(HUB_PATH, weights_bytes)
    path = download_default_weights(tmp_path, endpoint=fake_hub.url)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        WeightsUnavailableError, match=r"OFFLINE is set and the cached weights .* fail"
    ):
        download_default_weights(tmp_path, endpoint=fake_hub.url)
    assert leftovers(tmp_path) == []  # removed: never served as pretrained
