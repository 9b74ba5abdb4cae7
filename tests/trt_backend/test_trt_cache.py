"""Engine cache: keys, atomic writes, the build lock, and rebuilding bad plans."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from framecast_server.backends.tensorrt.cache import (
    BuildResult,
    EngineCache,
    EngineSpec,
    atomic_write_bytes,
)
from framecast_server.backends.tensorrt.errors import EngineCacheError
from support import wait_until

SPEC = EngineSpec(
    model_sha256="ab" * 32,
    tensorrt_version="10.13.0.35",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    precision="fp16",
    profile=(1, 32, 32),
    builder_optimization_level=3,
    workspace_bytes=1 << 30,
    converter="2+onnxconverter-common-1.16.0",
)


class CountingBuilder:
    """A fake build: returns a plan naming the call, and records the timing caches it got."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.timing_seen: list[bytes | None] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, timing: bytes | None) -> BuildResult:
        with self._lock:
            self.calls += 1
            n = self.calls
        self.timing_seen.append(timing)
        time.sleep(self.delay)
        return BuildResult(plan=f"plan #{n}".encode() * 1000, timing_cache=(timing or b"") + b"T")


@pytest.mark.parametrize(
    "change",
    [
        {"model_sha256": "cd" * 32},
        {"tensorrt_version": "10.14.1.48"},
        {"gpu_name": "NVIDIA L4"},
        {"compute_capability": (8, 9)},
        {"workspace_bytes": 2 << 30},
        {"converter": "3+onnxconverter-common-1.16.0"},
        {"precision": "fp32"},
        {"profile": (1, 16, 32)},
        {"profile": (1, 32, 64)},
        {"builder_optimization_level": 5},
    ],
)
def test_every_field_changes_the_key(change: dict[str, object]) -> None:
    other = dataclasses.replace(SPEC, **change)  # type: ignore[arg-type]
    assert other.key() != SPEC.key()


def test_key_is_stable_sha256() -> None:
    assert SPEC.key() == dataclasses.replace(SPEC).key()
    assert len(SPEC.key()) == 64
    int(SPEC.key(), 16)


def test_build_then_reuse(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), CountingBuilder()
    first = cache.get_or_build(SPEC, build)
    second = cache.get_or_build(SPEC, build)
    assert build.calls == 1
    assert first.built
    assert not second.built
    assert first.path == second.path == tmp_path / "engines" / f"{SPEC.key()}.plan"
    assert second.data == first.data == first.path.read_bytes()
    meta = json.loads((tmp_path / "engines" / f"{SPEC.key()}.json").read_text())
    assert meta["plan_size"] == len(first.data)
    assert meta["tensorrt_version"] == SPEC.tensorrt_version
    assert meta["gpu_name"] == SPEC.gpu_name


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _drop_metadata(path: Path) -> None:
    path.with_suffix(".json").unlink()


def _garble_metadata(path: Path) -> None:
    path.with_suffix(".json").write_text("{not json")


def _other_gpu_metadata(path: Path) -> None:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["gpu_name"] = "NVIDIA A100-SXM4-40GB"
    meta_path.write_text(json.dumps(meta))


def _other_trt_metadata(path: Path) -> None:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["tensorrt_version"] = "10.3.0.30"
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "logged"),
    [
        (_corrupt, "corrupt"),
        (_truncate, "truncated"),
        (_drop_metadata, "missing"),
        (_garble_metadata, "unreadable"),
        (_other_gpu_metadata, "gpu_name"),
        (_other_trt_metadata, "tensorrt_version"),
    ],
)
def test_bad_plan_is_detected_logged_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, logged: str
) -> None:
    cache, build = EngineCache(tmp_path), CountingBuilder()
    plan_path = cache.get_or_build(SPEC, build).path
    damage(plan_path)  # type: ignore[operator]
    data, reason = cache.check(SPEC)
    assert data is None
    assert reason is not None
    assert logged in reason
    with caplog.at_level(logging.WARNING):
        rebuilt = cache.get_or_build(SPEC, build)
    assert build.calls == 2
    assert rebuilt.built
    assert rebuilt.data == b"plan #2" * 1000 == plan_path.read_bytes()
    assert any(logged in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert cache.check(SPEC) == (rebuilt.data, None)


def test_missing_plan_is_not_reported_as_damage(tmp_path: Path) -> None:
    assert EngineCache(tmp_path).check(SPEC) == (None, None)


def test_timing_cache_is_persisted_per_trt_and_gpu(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), CountingBuilder()
    cache.get_or_build(SPEC, build)
    other_model = dataclasses.replace(SPEC, model_sha256="ef" * 32)
    cache.get_or_build(other_model, build)
    other_gpu = dataclasses.replace(SPEC, gpu_name="NVIDIA L4", compute_capability=(8, 9))
    cache.get_or_build(other_gpu, build)
    # Second build on the same TensorRT + GPU got the first build's timing cache back.
    assert build.timing_seen == [None, b"T", None]
    assert cache.timing_cache_path(SPEC) == cache.timing_cache_path(other_model)
    assert cache.timing_cache_path(SPEC) != cache.timing_cache_path(other_gpu)
    assert cache.timing_cache_path(SPEC).read_bytes() == b"TT"
    assert "sm90" in cache.timing_cache_path(SPEC).name


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_failed_atomic_write_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_builder_failure_leaves_no_plan(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)

    def failing(timing: bytes | None) -> BuildResult:
        raise RuntimeError("builder exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        cache.get_or_build(SPEC, failing)
    assert cache.check(SPEC) == (None, None)
    assert cache.get_or_build(SPEC, CountingBuilder()).built


def test_concurrent_threads_build_once(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), CountingBuilder(delay=0.3)
    results: list[bytes] = []

    def worker() -> None:
        results.append(cache.get_or_build(SPEC, build).data)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1
    assert results == [b"plan #1" * 1000] * 4


_OTHER_PROCESS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from framecast_server.backends.tensorrt.cache import BuildResult, EngineCache, EngineSpec
    spec = EngineSpec("ab" * 32, "10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0), "fp16",
                      (1, 32, 32), 3, 1 << 30, "2+onnxconverter-common-1.16.0")
    def build(timing):
        Path(sys.argv[2]).write_text("building")
        time.sleep(1.5)
        return BuildResult(b"built by the other process", None)
    EngineCache(Path(sys.argv[1])).get_or_build(spec, build)
    """
)


def test_second_process_waits_for_the_first_and_reuses_its_plan(tmp_path: Path) -> None:
    started = tmp_path / "started"
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "cache"), str(started)]
    )
    try:
        wait_until(lambda: started.exists() or other.poll() is not None,
                   "the helper process to start building")  # fmt: skip
        assert other.poll() is None, "helper process died"
        build = CountingBuilder()
        cached = EngineCache(tmp_path / "cache").get_or_build(SPEC, build)
    finally:
        assert other.wait(timeout=30) == 0
    assert build.calls == 0
    assert not cached.built
    assert cached.data == b"built by the other process"


def test_lock_timeout_is_a_typed_error(tmp_path: Path) -> None:
    import filelock

    cache = EngineCache(tmp_path, lock_timeout=0.2)
    cache.engines_dir.mkdir(parents=True)
    holder = filelock.FileLock(str(cache.lock_path(SPEC)))
    done = threading.Event()
    errors: list[BaseException] = []

    def contend() -> None:
        try:
            cache.get_or_build(SPEC, CountingBuilder())
        except BaseException as exc:
            errors.append(exc)
        done.set()

    with holder:
        thread = threading.Thread(target=contend)
        thread.start()
        assert done.wait(10)
        thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], EngineCacheError)
    assert errors[0].call == "filelock.FileLock.acquire"


def test_timing_cache_saved_by_another_build_meanwhile_is_merged(tmp_path: Path) -> None:
    merges: list[tuple[bytes, bytes]] = []

    def merge(on_disk: bytes, new: bytes) -> bytes:
        merges.append((on_disk, new))
        return on_disk + b"|" + new

    cache = EngineCache(tmp_path, merge_timing=merge)
    timing_path = cache.timing_cache_path(SPEC)

    def build(timing: bytes | None) -> BuildResult:
        # Another process's build of another model finishes and saves while this one runs.
        atomic_write_bytes(timing_path, b"theirs")
        return BuildResult(b"plan", (timing or b"") + b"ours")

    cache.get_or_build(SPEC, build)
    assert merges == [(b"theirs", b"ours")]
    assert timing_path.read_bytes() == b"theirs|ours"


def test_unchanged_timing_cache_is_replaced_without_merging(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, merge_timing=lambda a, b: pytest.fail("merged"))
    atomic_write_bytes(cache.timing_cache_path(SPEC), b"old")
    cache.get_or_build(SPEC, lambda timing: BuildResult(b"plan", (timing or b"") + b"+new"))
    assert cache.timing_cache_path(SPEC).read_bytes() == b"old+new"


def test_cache_files_are_shared_like_the_model_files(tmp_path: Path) -> None:
    """Plans, metadata and timing caches 0644 (model/prepare.py's mode), locks 0664: a build
    by one user is served by another, whatever the builder's umask."""
    old_umask = os.umask(0o077)
    try:
        cache = EngineCache(tmp_path)
        plan_path = cache.get_or_build(SPEC, CountingBuilder()).path
    finally:
        os.umask(old_umask)
    for path in (plan_path, cache.metadata_path(SPEC), cache.timing_cache_path(SPEC)):
        assert path.stat().st_mode & 0o777 == 0o644, path.name
    for lock in (cache.lock_path(SPEC), cache.timing_cache_path(SPEC).with_suffix(".cache.lock")):
        assert lock.stat().st_mode & 0o777 == 0o664, lock.name


def test_invalidating_a_refused_plan_keeps_one_another_process_rebuilt(tmp_path: Path) -> None:
    cache, build = EngineCache(tmp_path), CountingBuilder()
    refused = cache.get_or_build(SPEC, build).data
    # Another worker refused it too, discarded it and rebuilt it first.
    assert cache.invalidate(SPEC, "TensorRT refused it", refused=refused)
    rebuilt = cache.get_or_build(SPEC, build).data
    assert rebuilt != refused
    # This worker's late invalidation must not throw the fresh plan away.
    assert not cache.invalidate(SPEC, "TensorRT refused it", refused=refused)
    assert cache.check(SPEC) == (rebuilt, None)
    assert build.calls == 2


def test_invalidate_waits_for_a_rebuild_under_the_lock_and_keeps_it(tmp_path: Path) -> None:
    """Two workers refuse the same plan: B discards it and rebuilds; A's invalidation, coming
    while B builds, waits for B's lock and then leaves B's fresh plan alone."""
    cache = EngineCache(tmp_path)
    refused = cache.get_or_build(SPEC, CountingBuilder()).data
    building, finish = threading.Event(), threading.Event()

    def slow_build(timing: bytes | None) -> BuildResult:
        building.set()
        assert finish.wait(30)
        return BuildResult(plan=b"the rebuilt plan", timing_cache=None)

    def worker_b() -> None:
        cache.invalidate(SPEC, "refused by B", refused=refused)
        cache.get_or_build(SPEC, slow_build)

    kept: list[bool] = []
    b = threading.Thread(target=worker_b)
    b.start()
    assert building.wait(30)
    a = threading.Thread(
        target=lambda: kept.append(cache.invalidate(SPEC, "refused by A", refused=refused))
    )
    a.start()
    a.join(0.5)
    assert a.is_alive(), "invalidate ran while another process held the build lock"
    finish.set()
    b.join(30)
    a.join(30)
    assert kept == [False]
    assert cache.check(SPEC) == (b"the rebuilt plan", None)
