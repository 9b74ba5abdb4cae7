"""On-disk cache of built TensorRT engines and of TensorRT's timing cache.

An engine is only valid for the exact TensorRT version and GPU model it was built on, and
building one takes minutes, so plans are cached under a key that covers everything the build
depends on. Layout under the cache root::

    engines/<key>.plan   the serialized engine
    engines/<key>.json   metadata: what it was built for, its size and sha256 (written last)
    engines/<key>.lock   held while building, so two processes never build the same engine
    timing/<trt>_<gpu>_sm<cc>_<hash>.cache   TensorRT timing cache, shared by all builds there

Nothing here needs a GPU: the build itself is a callable handed in by the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock

from .errors import EngineCacheError

logger = logging.getLogger(__name__)

# Bump when the build recipe changes in a way the other key fields do not capture (e.g. the
# fp16 conversion), so old plans are not reused for a different graph.
KEY_SCHEMA = 2

_CHUNK = 1 << 20

# Like the model files (model/prepare.py): plans, metadata and timing caches readable by every
# user, so that `framecast build-engine` as one user and `serve` as another share the cache;
# lock files group-writable too, since taking the lock opens the file for writing.
FILE_MODE = 0o644
LOCK_MODE = 0o664


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the ResNet-50 ONNX is ~100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never part.

    Writes a temporary file in the same directory, fsyncs it and ``os.replace``s it over the
    target (atomic on POSIX and Windows within one filesystem). The file ends up FILE_MODE
    (mkstemp's 0600 would hide it from other users).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything a built engine depends on; its ``key()`` names the cached plan."""

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    profile: tuple[int, int, int]  # (min, opt, max) batch of the "images" input
    builder_optimization_level: int
    workspace_bytes: int  # the builder's workspace limit: it decides which tactics may run
    converter: str  # the fp16 conversion's recipe and library version (model.fp16)

    def as_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists)."""
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        data["profile"] = list(self.profile)
        return data

    def key(self) -> str:
        """sha256 over the canonical JSON of all fields plus the key schema version."""
        payload = {"schema": KEY_SCHEMA, **self.as_json()}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What a build returns: the serialized plan and the (updated) timing cache, if any."""

    plan: bytes
    timing_cache: bytes | None


# Called with the stored timing cache (None when there is none yet).
BuildFn = Callable[[bytes | None], BuildResult]
# Merges the timing cache on disk (first) into a build's new one (second); returns the result.
MergeFn = Callable[[bytes, bytes], bytes]


@dataclass(frozen=True, slots=True)
class CachedPlan:
    """A verified plan: where it lives, its bytes, and whether this call built it."""

    path: Path
    data: bytes
    built: bool


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


class EngineCache:
    """Engine plans and timing caches under ``root``; see the module docstring for the layout."""

    def __init__(
        self, root: Path, *, lock_timeout: float = 3600.0, merge_timing: MergeFn | None = None
    ) -> None:
        self.root = root
        # Without a merge function (tests without TensorRT) the last writer's cache wins.
        self.merge_timing = merge_timing
        self.engines_dir = root / "engines"
        self.timing_dir = root / "timing"
        # A ResNet-50 build takes minutes; waiting an hour for another process's build is
        # generous, but forever would hide a hung builder.
        self.lock_timeout = lock_timeout

    def plan_path(self, spec: EngineSpec) -> Path:
        """Where the plan for ``spec`` is (or would be) stored."""
        return self.engines_dir / f"{spec.key()}.plan"

    def metadata_path(self, spec: EngineSpec) -> Path:
        """The JSON metadata beside the plan."""
        return self.engines_dir / f"{spec.key()}.json"

    def lock_path(self, spec: EngineSpec) -> Path:
        """The lock file held while the plan for ``spec`` is being built."""
        return self.engines_dir / f"{spec.key()}.lock"

    def timing_cache_path(self, spec: EngineSpec) -> Path:
        """Timing cache for this TensorRT version and GPU, shared by builds of any model."""
        ident = f"{spec.tensorrt_version}|{spec.gpu_name}|{spec.compute_capability}"
        short = hashlib.sha256(ident.encode()).hexdigest()[:12]
        major, minor = spec.compute_capability
        name = f"trt{_slug(spec.tensorrt_version)}_{_slug(spec.gpu_name)}_sm{major}{minor}_{short}"
        return self.timing_dir / f"{name}.cache"

    def check(self, spec: EngineSpec) -> tuple[bytes | None, str | None]:
        """Read and verify the cached plan for ``spec``.

        Returns ``(plan, None)`` when valid, ``(None, None)`` when nothing is cached, and
        ``(None, reason)`` when something is cached but unusable (corrupt, truncated, built
        for another TensorRT or GPU, metadata missing or unreadable).
        """
        plan_path, meta_path = self.plan_path(spec), self.metadata_path(spec)
        if not plan_path.exists() and not meta_path.exists():
            return None, None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, f"metadata {meta_path.name} is missing (interrupted build?)"
        except (OSError, ValueError) as exc:
            return None, f"metadata {meta_path.name} is unreadable ({exc})"
        if not isinstance(meta, dict):
            return None, f"metadata {meta_path.name} is not a JSON object"
        expected = spec.as_json()
        for field in ("tensorrt_version", "gpu_name", "compute_capability"):
            if meta.get(field) != expected[field]:
                return None, (
                    f"plan was built for {field}={meta.get(field)!r}, "
                    f"this machine has {expected[field]!r}"
                )
        if meta.get("key") != spec.key() or meta.get("spec") != expected:
            return None, "metadata does not describe this engine (key or settings differ)"
        try:
            data = plan_path.read_bytes()
        except FileNotFoundError:
            return None, f"plan {plan_path.name} is missing"
        except OSError as exc:
            return None, f"plan {plan_path.name} is unreadable ({exc})"
        if len(data) != meta.get("plan_size"):
            return None, (
                f"plan is {len(data)} bytes, metadata says {meta.get('plan_size')} (truncated?)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.get("plan_sha256"):
            return None, f"plan sha256 {digest[:16]}... does not match the metadata (corrupt)"
        return data, None

    def invalidate(self, spec: EngineSpec, reason: str, *, refused: bytes | None = None) -> bool:
        """Delete the plan and metadata for ``spec`` (e.g. TensorRT refused to load it).

        Runs under the build lock, so it never deletes a plan while another process writes
        it. With ``refused`` (the plan the caller could not load) a different plan found
        there is kept: another process has rebuilt it meanwhile. Returns whether it deleted.
        """
        with self._locked(spec):
            if refused is not None:
                data, _ = self.check(spec)
                if data is not None and data != refused:
                    logger.info(
                        "cached TensorRT engine %s was rebuilt by another process; keeping it",
                        spec.key()[:16],
                    )
                    return False
            self._discard(spec, reason)
            return True

    def _discard(self, spec: EngineSpec, reason: str) -> None:
        """Delete the plan and metadata for ``spec``; the caller holds the build lock."""
        logger.warning("discarding cached TensorRT engine %s: %s", spec.key()[:16], reason)
        for path in (self.metadata_path(spec), self.plan_path(spec)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def get_or_build(self, spec: EngineSpec, build: BuildFn) -> CachedPlan:
        """Return the verified cached plan for ``spec``, building (once, under a lock) if needed.

        A plan that fails verification is logged, deleted and rebuilt. The timing cache for
        this TensorRT version and GPU is passed to ``build`` and whatever it returns is saved.
        """
        data, _ = self.check(spec)
        if data is not None:
            logger.info("using cached TensorRT engine %s", self.plan_path(spec))
            return CachedPlan(self.plan_path(spec), data, built=False)
        with self._locked(spec):
            # Re-check under the lock: another process may have finished the build meanwhile.
            data, reason = self.check(spec)
            if data is not None:
                logger.info(
                    "using TensorRT engine built by another process: %s", self.plan_path(spec)
                )
                return CachedPlan(self.plan_path(spec), data, built=False)
            if reason is not None:
                self._discard(spec, f"{reason}; rebuilding")
            return self._build(spec, build)

    def _build(self, spec: EngineSpec, build: BuildFn) -> CachedPlan:
        timing_path = self.timing_cache_path(spec)
        timing: bytes | None = None
        with contextlib.suppress(FileNotFoundError):
            timing = timing_path.read_bytes()
        logger.info(
            "building TensorRT engine %s (profile %s, level %d, timing cache %s)",
            spec.key()[:16],
            spec.profile,
            spec.builder_optimization_level,
            f"{len(timing)} bytes" if timing else "empty",
        )
        started = time.monotonic()
        result = build(timing)
        if not result.plan:
            raise EngineCacheError("build", "the builder returned an empty plan")
        plan_path = self.plan_path(spec)
        # Plan first, metadata last: the metadata is the commit marker, so a crash in between
        # leaves a plan without metadata, which check() reports and the next call rebuilds.
        atomic_write_bytes(plan_path, result.plan)
        meta = {
            "key": spec.key(),
            "spec": spec.as_json(),
            **spec.as_json(),
            "plan_size": len(result.plan),
            "plan_sha256": hashlib.sha256(result.plan).hexdigest(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        atomic_write_bytes(self.metadata_path(spec), json.dumps(meta, indent=2).encode())
        if result.timing_cache:
            self._save_timing(timing_path, timing, result.timing_cache)
        logger.info(
            "built TensorRT engine %s in %.1f s (%d bytes)",
            plan_path,
            time.monotonic() - started,
            len(result.plan),
        )
        return CachedPlan(plan_path, result.plan, built=True)

    def _save_timing(self, path: Path, given: bytes | None, new: bytes) -> None:
        """Save ``new``, merged with whatever another build saved since ``given`` was read.

        Builds of different models run at once and share this file; under its lock the file is
        re-read and, if it changed, combined with ours, so neither build's timings are lost.
        """
        lock_path = str(path.with_name(path.name + ".lock"))
        with filelock.FileLock(lock_path, timeout=60, mode=LOCK_MODE):
            on_disk: bytes | None = None
            with contextlib.suppress(FileNotFoundError):
                on_disk = path.read_bytes()
            if on_disk and on_disk != given and self.merge_timing is not None:
                new = self.merge_timing(on_disk, new)
            atomic_write_bytes(path, new)

    @contextlib.contextmanager
    def _locked(self, spec: EngineSpec) -> Iterator[None]:
        self.engines_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.lock_path(spec)), mode=LOCK_MODE)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            logger.info(
                "another process is building TensorRT engine %s; waiting up to %.0f s",
                spec.key()[:16],
                self.lock_timeout,
            )
            try:
                lock.acquire(timeout=self.lock_timeout)
            except filelock.Timeout as exc:
                raise EngineCacheError(
                    "filelock.FileLock.acquire",
                    f"{self.lock_path(spec)} still held after {self.lock_timeout:.0f} s",
                ) from exc
        try:
            yield
        finally:
            lock.release()
