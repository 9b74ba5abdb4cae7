"""The SIMULATED device: its latency model, one batch at a time host-wide, MPS's limit."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest
from framecast_server.backends.base import Backend
from framecast_server.backends.simulated import (
    DeviceModel,
    SimulatedBackend,
    SimulatedDevice,
    open_simulated_backend,
)


def test_latency_is_a_launch_plus_a_cost_per_image() -> None:
    model = DeviceModel()
    assert model.latency_s(1) == pytest.approx(420e-6)
    assert model.latency_s(128) == pytest.approx(400e-6 + 128 * 20e-6)
    assert 128 / model.latency_s(128) > 10 * (1 / model.latency_s(1))  # batches pay off
    assert DeviceModel(slowdown=3).latency_s(32) == pytest.approx(3 * model.latency_s(32))
    with pytest.raises(ValueError, match="bad device model"):
        DeviceModel(slowdown=0)


def test_the_backend_answers_like_the_null_backend_and_counts_device_time(tmp_path: Path) -> None:
    device = SimulatedDevice(tmp_path / "gpu")
    model = DeviceModel(launch_us=2000, per_image_us=500)
    backend = SimulatedBackend(device, model, max_batch=8)
    assert isinstance(backend, Backend)
    images = np.zeros((4, 224, 224, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = [3, 1, 4, 1]
    rows = backend.infer(images)
    assert list(rows.argmax(axis=1)) == [3, 1, 4, 1]
    totals = device.totals()
    assert (totals.batches, totals.images) == (1, 4)
    assert totals.by_size == (0, 0, 1, 0, 0, 0, 0, 0)  # one batch in the 4-7 bucket
    assert totals.device_ns == 4_000_000  # 2 ms + 4 x 0.5 ms, as modelled
    assert totals.busy_ns >= 4_000_000  # measured: at least the modelled time
    assert backend.info.device == "SIMULATED H100"
    backend.close()
    device.close()


def _hold(spec: str, batches: int, start: object, out: object) -> None:
    backend = open_simulated_backend(spec, max_batch=1)
    device = backend.device
    start.wait()  # type: ignore[attr-defined]
    spans = [device.run(DeviceModel(launch_us=40_000, per_image_us=0), 1) for _ in range(batches)]
    out.put(spans)  # type: ignore[attr-defined]
    device.close()


def _spans(spec: str, processes: int, batches: int) -> list[tuple[float, float]]:
    context = multiprocessing.get_context("fork")  # the children run this module's _hold
    start = context.Barrier(processes)
    out = context.Queue()
    children = [
        context.Process(target=_hold, args=(spec, batches, start, out)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    spans = [span for _ in children for span in out.get(timeout=120)]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    return spans


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in events:  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


def test_without_mps_processes_hold_the_device_one_batch_at_a_time(tmp_path: Path) -> None:
    spans = _spans(str(tmp_path / "gpu"), processes=3, batches=3)
    assert len(spans) == 9
    assert _most_at_once(spans) == 1
    device = SimulatedDevice(tmp_path / "gpu")
    totals = device.totals()
    assert totals.batches == 9
    assert totals.busy_ns >= 9 * 40_000_000  # nothing overlapped
    device.close()


def test_mps_runs_batches_of_several_processes_at_once_up_to_its_limit(tmp_path: Path) -> None:
    spans = _spans(f"{tmp_path / 'gpu'},mode=mps,mps_limit=2", processes=3, batches=3)
    assert _most_at_once(spans) == 2
    device = SimulatedDevice(tmp_path / "gpu", mode="mps", mps_limit=2)
    totals = device.totals()
    assert totals.batches == 9
    assert totals.busy_ns < 9 * 40_000_000  # launches overlapped
    device.close()


def test_one_process_overlaps_its_own_batches_launches_as_streams_do(tmp_path: Path) -> None:
    device = SimulatedDevice(tmp_path / "gpu")
    model = DeviceModel(launch_us=100_000, per_image_us=0)
    spans: list[tuple[float, float]] = []
    threads = [
        threading.Thread(target=lambda: spans.append(device.run(model, 1))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _most_at_once(spans) == 2
    device.close()


def test_a_bad_device_spec_is_refused(tmp_path: Path) -> None:
    for spec in (f"{tmp_path},mode=shared", f"{tmp_path},colour=red", f"{tmp_path},mps_limit=0"):
        with pytest.raises(ValueError, match=r"option|mode|mps_limit"):
            open_simulated_backend(spec, max_batch=4)
