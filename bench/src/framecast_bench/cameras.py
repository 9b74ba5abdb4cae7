"""Camera-fleet load: N cameras, each a realtime stream sending open loop at F frames/s.

A camera captures frame ``k`` at ``start + phase + k / F`` whether or not its earlier frames
were answered (cameras do not wait for servers); its phase is random within one frame
interval, so cameras are not in lockstep. End-to-end latency runs from that scheduled
capture to the answer, so a client that falls behind cannot hide it; how late the capture
was actually taken is recorded as well (``capture_late``: large values mean the benchmarking
host, not the server, was the bottleneck).

* Framecast: each camera is a realtime session of the SDK (``Client.stream(mode="realtime")``,
  reconnection off: a broken stream is a result of the step), which drops the oldest unsent
  frame when the server falls behind and, following the server's rate hints, skips frames at
  capture; both count as dropped on the client. The server states each frame's age at compute.
* Open Inference Protocol (Triton, KServe, Framecast's OIP endpoint): each camera is one
  ModelStreamInfer call with at most ``max_in_flight`` frames unanswered; a frame captured
  while the window is full is dropped on the client. The protocol states no frame age: it is
  reported absent.

A step opens every camera, warms up, then measures windows until the bench's stability rule
(:func:`framecast_bench.stats.is_stable`) holds or ``max_windows`` have passed, as the other
load modes do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
from framecast_client.client import Client
from framecast_client.streaming import FrameError
from framecast_client.types import Classification

from framecast_bench.camera_stats import FleetRecorder, FleetWindow, summarize
from framecast_bench.inputs import Payload
from framecast_bench.oip_sessions import OipTarget
from framecast_bench.runner import Clock, StepConfig, error_name
from framecast_bench.stats import is_stable

# Between opening the last camera and the first capture: every stream is up by then.
_LEAD_S = 0.1


@dataclass(frozen=True)
class FleetOptions:
    """What every camera of a step does."""

    fps: float
    top_k: int = 1
    max_in_flight: int | None = None  # None: the SDK's realtime default (3)
    max_age_s: float | None = None
    follow_hints: bool = True


class Fleet:
    """What the cameras of one step share: the schedule, the recorder, the stop signal."""

    def __init__(
        self, cameras: int, options: FleetOptions, seed: int, clock: Clock = time.perf_counter
    ) -> None:
        self.options = options
        self.cameras = cameras
        self.clock = clock
        max_age_ms = None if options.max_age_s is None else options.max_age_s * 1000.0
        self.recorder = FleetRecorder(cameras, max_age_ms, clock)
        self.stop = threading.Event()
        self.go = threading.Event()
        self.start = 0.0
        rng = np.random.default_rng(seed)
        self._phases = [float(x) for x in rng.uniform(0.0, 1.0 / options.fps, size=cameras)]

    def due(self, camera: int, k: int) -> float:
        """When camera ``camera`` captures its frame ``k``."""
        return self.start + self._phases[camera] + k / self.options.fps

    def begin(self) -> None:
        """Start every camera's clock, a short lead from now."""
        self.start = self.clock() + _LEAD_S
        self.go.set()

    def captures(self, camera: int) -> Iterator[int]:
        """Frame numbers of ``camera``, each yielded at its capture time (counted captured)."""
        while not self.go.wait(0.1):
            if self.stop.is_set():
                return
        k = 0
        while not self.stop.is_set():
            due = self.due(camera, k)
            delay = due - self.clock()
            if delay > 0 and self.stop.wait(delay):
                return
            self.recorder.captured(camera, max(0.0, self.clock() - due) * 1000.0)
            yield k
            k += 1


class Camera(Protocol):
    """One camera's stream for the length of a step."""

    def sample(self) -> None:
        """Record what the camera's session counted since the last call (window boundary)."""
        ...

    def close(self) -> None:
        """End the stream and its threads."""
        ...


#: Opens camera ``index`` of a fleet.
CameraOpener = Callable[[int, Fleet], Camera]


class FramecastCamera:
    """A camera on the SDK's realtime session."""

    def __init__(
        self, index: int, fleet: Fleet, client: Client, payloads: Sequence[Payload]
    ) -> None:
        self._index = index
        self._fleet = fleet
        self._payloads = payloads
        self._dropped = 0
        o = fleet.options
        self._session = client.stream(
            self._frames(),
            mode="realtime",
            max_in_flight=o.max_in_flight,
            top_k=o.top_k,
            reconnect=False,
            max_age=o.max_age_s,
            follow_hints=o.follow_hints,
            name=f"bench-camera-{index}",
        )
        self._thread = threading.Thread(
            target=self._consume, name=f"bench-camera-{index}", daemon=True
        )
        self._thread.start()

    def _frames(self) -> Iterator[Any]:
        n = len(self._payloads)
        # Each camera its own sequence of frames: the inputs, from its own offset.
        for k in self._fleet.captures(self._index):
            yield self._payloads[(self._index + k) % n].batch[0]

    def _consume(self) -> None:
        fleet, recorder, cam = self._fleet, self._fleet.recorder, self._index
        try:
            for result in self._session:
                latency_ms = (fleet.clock() - fleet.due(cam, result.index)) * 1000.0
                outcome = result.outcome
                if isinstance(outcome, Classification):
                    recorder.answered(cam, latency_ms, result.age_ms)
                elif isinstance(outcome, FrameError) and outcome.origin == "client":
                    recorder.dropped_client(cam)  # could not be prepared: never sent
                else:
                    recorder.dropped_server(cam, outcome.drop_reason or outcome.code.name)
        except Exception as exc:  # the stream ended with an error: a result of the step
            if not fleet.stop.is_set():
                recorder.stream_error(error_name(exc))

    def sample(self) -> None:
        # The session counts the frames it dropped (replaced, skipped on the hint, lost).
        dropped = self._session.stats.dropped
        self._fleet.recorder.dropped_client(self._index, dropped - self._dropped)
        self._dropped = dropped

    def close(self) -> None:
        self._session.close()
        self._thread.join(timeout=10.0)


class OipCamera:
    """A camera on one ModelStreamInfer call; drops a capture while its window is full."""

    def __init__(
        self, index: int, fleet: Fleet, target: OipTarget, payloads: Sequence[Payload]
    ) -> None:
        self._index = index
        self._fleet = fleet
        self._target = target
        self._payloads = payloads
        window = fleet.options.max_in_flight or 3  # as the SDK's realtime sessions
        self._slots = threading.Semaphore(window)
        self._channel, stub = target.connect()
        self._call = stub.ModelStreamInfer(self._requests())
        self._thread = threading.Thread(
            target=self._consume, name=f"bench-oip-camera-{index}", daemon=True
        )
        self._thread.start()

    def _requests(self) -> Iterator[Any]:
        n, top_k = len(self._payloads), self._fleet.options.top_k
        for k in self._fleet.captures(self._index):
            if not self._slots.acquire(blocking=False):
                self._fleet.recorder.dropped_client(self._index)
                continue
            batch = self._payloads[(self._index + k) % n].batch
            yield self._target.request(batch, top_k=top_k, request_id=str(k))

    def _consume(self) -> None:
        fleet, recorder, cam = self._fleet, self._fleet.recorder, self._index
        try:
            for response in self._call:
                self._slots.release()
                k = int(response.infer_response.id)
                latency_ms = (fleet.clock() - fleet.due(cam, k)) * 1000.0
                if response.error_message:
                    recorder.dropped_server(cam, "ERROR")
                else:
                    recorder.answered(cam, latency_ms, None)  # OIP states no frame age
        except grpc.RpcError as exc:
            if not fleet.stop.is_set():  # our own cancel at the step's end is no error
                recorder.stream_error(error_name(exc))

    def sample(self) -> None:
        """Nothing to read: this camera counts its drops as they happen."""

    def close(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]
        self._thread.join(timeout=10.0)
        self._channel.close()


def framecast_cameras(client: Client, payloads: Sequence[Payload]) -> CameraOpener:
    """Cameras on Framecast's protocol through ``client`` (payloads as ``stream_payloads``)."""
    return lambda index, fleet: FramecastCamera(index, fleet, client, payloads)


def oip_cameras(target: OipTarget, payloads: Sequence[Payload]) -> CameraOpener:
    """Cameras on an Open Inference Protocol server's ModelStreamInfer."""
    return lambda index, fleet: OipCamera(index, fleet, target, payloads)


def _wait(fleet: Fleet, until: float) -> bool:
    """Sleep until ``until``; False if every camera's stream has failed meanwhile."""
    while (left := until - fleet.clock()) > 0:
        if sum(fleet.recorder.stream_errors.values()) >= fleet.cameras:
            return False
        time.sleep(min(0.05, left))
    return True


def run_camera_step(
    open_camera: CameraOpener,
    cameras: int,
    options: FleetOptions,
    config: StepConfig,
    *,
    seed: int = 0,
    clock: Clock = time.perf_counter,
) -> tuple[dict[str, Any], bool, list[FleetWindow]]:
    """Run ``cameras`` cameras for one step: (the step's figures, stable, the windows)."""
    if cameras < 1:
        raise ValueError(f"cameras must be >= 1, got {cameras}")
    fleet = Fleet(cameras, options, seed, clock)
    opened: list[Camera] = []
    windows: list[FleetWindow] = []
    stable = False
    try:
        for index in range(cameras):
            opened.append(open_camera(index, fleet))
        fleet.begin()
        alive = _wait(fleet, fleet.start + config.warmup_s)
        for camera in opened:
            camera.sample()
        fleet.recorder.rotate()  # the warm-up: discarded
        while alive and not stable and len(windows) < config.max_windows:
            opened_at = fleet.clock()
            alive = _wait(fleet, opened_at + config.window_s)
            for camera in opened:
                camera.sample()
            windows.append(fleet.recorder.rotate())
            stable = is_stable(
                [w.result() for w in windows], config.stability_windows, config.stability_tolerance
            )
    finally:
        fleet.stop.set()
        for camera in opened:
            camera.close()
    used = config.stability_windows if stable else min(config.stability_windows, len(windows))
    figures = (
        summarize(windows, used, fleet.recorder.stream_errors)
        if windows
        else {"stream_errors": dict(fleet.recorder.stream_errors)}
    )
    return figures, stable, windows
