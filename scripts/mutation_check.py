"""Show that the device-free TensorRT tests catch the bugs a GPU would: each mutation must fail.

Usage: uv run python scripts/mutation_check.py [--only TEXT]

Copies the server package to a temporary directory, applies one deliberate bug to the copy,
and runs the TensorRT backend tests against it (the copy comes first on PYTHONPATH, ahead of
the editable install). The unmutated copy must pass and every mutation must fail; exits 1
otherwise. Each mutation is a bug the synchronous fakes of the past let through, or one that a
GPU host would meet first (lost overlap, a second CUDA context, an engine that is not FP16).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "server" / "src" / "framecast_server"
BACKEND = Path("backends/tensorrt/backend.py")
SLOT = Path("backends/tensorrt/slot.py")
BUILDER = Path("backends/tensorrt/builder.py")
CACHE = Path("backends/tensorrt/cache.py")
CUDA = Path("backends/tensorrt/cuda.py")
BATCH_WORKERS = Path("core/batching/workers.py")  # the batcher's threads build the input
TESTS = ["tests/trt_backend"]


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``path``."""

    name: str
    path: Path
    old: str
    new: str


MUTATIONS = (
    Mutation(
        "results read without synchronizing the stream",
        SLOT,
        "        self.stream.synchronize()\n",
        "        pass  # mutation: no synchronize\n",
    ),
    Mutation(
        "two slots share one pinned input buffer",
        BACKEND,
        "            self._slots.append(Slot(engine, layout))\n",
        "            self._slots.append(Slot(engine, layout))\n"
        "        self._slots[1].host_in = self._slots[0].host_in  # mutation: shared buffer\n",
    ),
    Mutation(
        "pycuda Stream object passed to execute_async_v3 instead of its handle",
        SLOT,
        "ctx.execute_async_v3(self.stream.handle)",
        "ctx.execute_async_v3(self.stream.raw)",
    ),
    Mutation(
        "a synchronize after every batch (no overlap of copies and compute)",
        SLOT,
        "        cuda.copy_to_host_async(self.host_out.array[:n], self.dev_out, self.stream)\n",
        "        cuda.copy_to_host_async(self.host_out.array[:n], self.dev_out, self.stream)\n"
        "        self.stream.synchronize()  # mutation: wait for each batch\n",
    ),
    Mutation(
        "a builder without strong typing (TensorRT 10 picks precisions itself)",
        BUILDER,
        "network = builder.create_network(flags)",
        "network = builder.create_network(0)",
    ),
    Mutation(
        "an engine left in fp32 (the graph is not converted to fp16)",
        BUILDER,
        "model_bytes = convert_to_fp16(onnx_model).SerializeToString()",
        "model_bytes = onnx_model.SerializeToString()",
    ),
    Mutation(
        "a batch outside the profile reaches TensorRT",
        BACKEND,
        "if not 1 <= n <= self.max_batch:",
        "if not 1 <= n:",
    ),
    Mutation(
        "a CUDA context of the worker's own beside the primary one (two per process)",
        CUDA,
        '        self._ctx: Any = _call("Device.retain_primary_context", '
        "dev.retain_primary_context)\n"
        "        # Retaining does not make the context current; push it on this (the worker's) "
        "thread.\n"
        '        _call("Context.push", self._ctx.push)\n',
        '        self._ctx = _call("Device.make_context", dev.make_context, 4)  # mutation\n',
    ),
    Mutation(
        "the batch joined on the host before the copy into pinned memory",
        BATCH_WORKERS,
        "self._gather = backend if isinstance(backend, GatheringBackend) else None",
        "self._gather = None",
    ),
    Mutation(
        "a cached plan invalidated outside the build lock",
        CACHE,
        "        with self._locked(spec):\n            if refused is not None:",
        "        with contextlib.nullcontext():\n            if refused is not None:",
    ),
    Mutation(
        "engine cache files left 0600 (unreadable by the serving user)",
        CACHE,
        "        tmp.chmod(FILE_MODE)\n",
        "",
    ),
)


def run_tests(source_root: Path) -> tuple[int, str]:
    """Run TESTS with ``source_root`` first on the path; return pytest's status and the first
    failing test (pytest's own counts are not repeated: CI reads the suite's closing line)."""
    env = dict(os.environ, PYTHONPATH=str(source_root))
    check = subprocess.run(
        [sys.executable, "-c", "import framecast_server; print(framecast_server.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    if not check.stdout.strip().startswith(str(source_root)):
        raise SystemExit(f"the copy is not the package imported: {check.stdout.strip()}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    if failing:
        return result.returncode, "first failing test " + failing[0].split()[1]
    return result.returncode, f"pytest exit status {result.returncode}"


def main() -> int:
    """Run the control and every mutation; print one line each; 0 when all are as expected."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="run the control and the mutations whose name or file holds TEXT (e.g. batching)",
    )
    args = parser.parse_args()
    chosen = [
        m for m in MUTATIONS if args.only is None or args.only in f"{m.name} {m.path.as_posix()}"
    ]
    if not chosen:
        parser.error(f"no mutation matches {args.only!r}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="framecast-mutants-") as tmp:
        for mutation in (None, *chosen):
            source_root = Path(tmp) / ("control" if mutation is None else f"m{id(mutation)}")
            shutil.copytree(
                PACKAGE, source_root / "framecast_server", ignore=shutil.ignore_patterns("*.pyc")
            )
            if mutation is not None:
                target = source_root / "framecast_server" / mutation.path
                text = target.read_text()
                if text.count(mutation.old) != 1:
                    print(f"ERROR  {mutation.name}: the code to mutate is not there once")
                    ok = False
                    continue
                target.write_text(text.replace(mutation.old, mutation.new))
            status, last = run_tests(source_root)
            if mutation is None:
                passed = status == 0
                print(f"{'ok' if passed else 'FAIL':6} unmutated copy passes: {last}")
            else:
                passed = status == 1  # tests ran and failed (not a crash or a usage error)
                print(f"{'ok' if passed else 'FAIL':6} caught: {mutation.name}: {last}")
            ok = ok and passed
    print("mutation check:", "every mutation was caught" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
