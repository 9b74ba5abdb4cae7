"""Through gRPC: the memory budget is flow control for streams and RESOURCE_EXHAUSTED for unary
calls; streams per connection, connections and idle connections are limited."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from framecast_bench import oip_codec as oip
from framecast_client import AsyncClient, Client, ResourceExhaustedError, wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_oip._proto import open_inference_pb2 as oip_pb
from framecast_oip._proto import open_inference_pb2_grpc as oip_grpc
from framecast_server.process.background import BackgroundServer
from framecast_server.process.transport import ACCEPT_LOOPS
from framecast_server.settings import FRAME_BYTES
from support import (
    HoldableNullBackend,
    RawClassifier,
    ServedHost,
    in_process_only,
    make_settings,
    random_frames,
    wait_until,
    write_tokens,
)

WAIT_S = 30.0


def test_a_spent_budget_stops_streams_reading_and_refuses_unary_calls(
    start_host: Callable[..., ServedHost], tmp_path: Path
) -> None:
    budget = 16 * FRAME_BYTES
    # Two callers: a stream and a camera with modest demand (on one host, so told apart by
    # their tokens). Against `--workers 2 --inference shared` the budget is the host's, kept by
    # the inference process for both front ends.
    tokens = write_tokens(tmp_path / "tokens", "stream", "camera")
    host = start_host(max_batch=8, max_queue=64, memory_budget_bytes=budget, auth_tokens=tokens)
    with (
        # Room for five calls at once: four admitted and one refused.
        Client(host.address, timeout=WAIT_S, token="camera-secret") as polite,
        ThreadPoolExecutor(8) as pool,
    ):
        host.hold()
        sent: list[int] = []

        def frames() -> Iterator[pb.StreamRequest]:
            for i in range(40):
                sent.append(i)
                image = wire.image_to_proto(random_frames(1, seed=i)[0])
                yield pb.StreamRequest(frame_id=i, image=image)

        raw = RawClassifier(host.address, token="stream-secret")
        stream = pool.submit(
            lambda: [
                pb.StreamResponse.FromString(r)
                for r in raw.stream((f.SerializeToString() for f in frames()), timeout=WAIT_S)
            ]
        )
        # The stream holds more than a max batch, so it stops at three quarters of the budget;
        # the client has sent more than that, but the server stopped reading.
        wait_until(lambda: host.admitted_bytes() == 12 * FRAME_BYTES, "the stream never filled")
        # gRPC takes the next frames from the client as the window allows, on its own thread.
        wait_until(lambda: len(sent) > 12, "the client to send more than the server read")
        assert host.admitted_bytes() == 12 * FRAME_BYTES
        # A camera with modest demand still gets the last quarter...
        calls = [pool.submit(polite.classify_preprocessed, random_frames(1)) for _ in range(4)]
        wait_until(
            lambda: host.admitted_bytes() == budget,
            "the unary calls to be admitted",
            seen=lambda: (
                f"{host.admitted_bytes() // FRAME_BYTES} frames admitted; the calls: "
                f"{[repr(c.exception()) if c.done() else 'waiting' for c in calls]}"
            ),
        )
        # ...and past the budget a unary call is refused at once.
        with pytest.raises(ResourceExhaustedError, match="memory budget"):
            polite.classify_preprocessed(random_frames(1))
        assert host.admitted_bytes() == budget
        host.release()
        answers = stream.result(WAIT_S)
        assert [a.frame_id for a in answers] == list(range(40))
        assert all(a.HasField("classification") for a in answers)
        assert all(len(call.result(WAIT_S)) == 1 for call in calls)
        raw.close()


def test_a_spent_budget_stops_an_open_inference_protocol_stream_reading_too(
    start_host: Callable[..., ServedHost],
) -> None:
    # ModelStreamInfer meets the budget as ClassifyStream does: it stops reading, and no
    # request is refused for a full server.
    budget = 16 * FRAME_BYTES
    host = start_host(max_batch=8, max_queue=64, memory_budget_bytes=budget)
    with grpc.insecure_channel(host.address) as channel, ThreadPoolExecutor(1) as pool:
        host.hold()
        sent: list[int] = []

        def requests() -> Iterator[oip_pb.ModelInferRequest]:
            for i in range(40):
                sent.append(i)
                frame = random_frames(1, seed=i)
                yield oip.infer_request(frame, model_name="resnet50", request_id=str(i))

        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        stream = pool.submit(lambda: list(stub.ModelStreamInfer(requests(), timeout=WAIT_S)))
        wait_until(lambda: host.admitted_bytes() == 12 * FRAME_BYTES, "the stream never filled")
        # Sent, but not read: the server stopped reading (gRPC takes the next frames from the
        # client as the window allows, on its own thread).
        wait_until(lambda: len(sent) > 12, "the client to send more than the server read")
        assert host.admitted_bytes() == 12 * FRAME_BYTES
        host.release()
        answers = stream.result(WAIT_S)
        assert [a.error_message for a in answers] == [""] * 40
        assert [a.infer_response.id for a in answers] == [str(i) for i in range(40)]


@in_process_only(
    "counts the calls in one server's gate; the per-connection stream limit is a gRPC option "
    "of each front end, which the shared inference process does not change"
)
def test_streams_beyond_the_per_connection_limit_wait_their_turn(cache_dir: Path) -> None:
    settings = make_settings(cache_dir, backend="null", max_streams_per_connection=2)
    with BackgroundServer(settings) as server:
        raw = RawClassifier(server.address)
        gate = server.server.gate
        opened = [threading.Event() for _ in range(3)]
        finish = [threading.Event() for _ in range(3)]
        frame = pb.StreamRequest(frame_id=1, image=wire.image_to_proto(random_frames(1)[0]))

        def requests(i: int) -> Iterator[bytes]:
            opened[i].set()
            yield frame.SerializeToString()
            finish[i].wait(WAIT_S)

        def run(i: int) -> list[bytes]:
            return list(raw.stream(requests(i), timeout=60))

        with ThreadPoolExecutor(3) as pool:
            streams = []
            for i in range(3):
                streams.append(pool.submit(run, i))
                opened[i].wait(WAIT_S)
            wait_until(lambda: gate.active >= 2, "two streams never started")
            time.sleep(0.2)  # let a third stream start if the limit failed to hold it back
            assert gate.active == 2
            finish[0].set()
            assert len(streams[0].result(WAIT_S)) == 1
            for event in finish:
                event.set()
            assert [len(s.result(WAIT_S)) for s in streams] == [1, 1, 1]
        raw.close()


def test_a_client_opens_connections_as_its_calls_need_under_the_per_connection_limit(
    start_host: Callable[..., ServedHost],
) -> None:
    host = start_host(max_streams_per_connection=2)
    with (
        Client(host.address, timeout=WAIT_S, connections=3) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        assert client.model_info().max_calls_per_connection == 2
        host.hold()
        calls = [pool.submit(client.classify_preprocessed, random_frames(1)) for _ in range(6)]
        # All six reach the server at once: on one connection only two could.
        wait_until(
            lambda: host.admitted_bytes() == 6 * FRAME_BYTES,
            "the calls queued on the client behind one connection's limit",
        )
        host.release()
        assert [len(call.result(WAIT_S)) for call in calls] == [1] * 6


def test_a_client_keeps_one_connection_unless_asked_for_more(
    start_host: Callable[..., ServedHost],
) -> None:
    # One connection is one caller to the server's fair queue: a client does not spread
    # itself over more on its own, or a flood of one program would count as many callers.
    host = start_host(max_streams_per_connection=2)
    with Client(host.address, timeout=WAIT_S) as client, ThreadPoolExecutor(4) as pool:
        client.model_info()
        host.hold()
        calls = [pool.submit(client.classify_preprocessed, random_frames(1)) for _ in range(4)]
        wait_until(lambda: host.admitted_bytes() == 2 * FRAME_BYTES, "none admitted")
        time.sleep(0.2)  # let more calls in if the client opened another connection
        assert host.admitted_bytes() == 2 * FRAME_BYTES
        host.release()
        assert [len(call.result(WAIT_S)) for call in calls] == [1] * 4


@in_process_only(
    "the AsyncClient's connections, as the sync test above, which runs against both hosts"
)
@pytest.mark.asyncio
async def test_an_async_client_opens_connections_as_its_calls_need(cache_dir: Path) -> None:
    backend = HoldableNullBackend()
    settings = make_settings(cache_dir, backend="null", max_streams_per_connection=2)
    with BackgroundServer(settings, backend_factory=lambda _: backend) as server:
        serving = server.serving
        assert serving is not None
        async with AsyncClient(server.address, timeout=WAIT_S, connections=3) as client:
            await client.model_info()
            backend.hold()
            calls = [
                asyncio.ensure_future(client.classify_preprocessed(random_frames(1)))
                for _ in range(6)
            ]
            deadline = time.monotonic() + WAIT_S
            while serving.batcher.admitted_bytes < 6 * FRAME_BYTES:
                assert time.monotonic() < deadline, "the calls queued behind one connection"
                await asyncio.sleep(0.01)
            backend.release()
            assert [len(r) for r in await asyncio.gather(*calls)] == [1] * 6


@in_process_only(
    "--max-connections is each process's own gRPC limit (every front end takes its share "
    "per accept loop); the count asserted is one process's"
)
def test_connections_beyond_the_limit_are_refused(cache_dir: Path) -> None:
    # The limit is shared by the servers on the port (one per accept loop), a quarter each:
    # connections beyond it are refused, and a closed one frees its place.
    settings = make_settings(cache_dir, backend="null", max_connections=ACCEPT_LOOPS)
    with BackgroundServer(settings) as server:
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(3 * ACCEPT_LOOPS)
        ]
        try:
            stubs = [RawInfo(channel) for channel in channels]
            assert stubs[0].ok()
            served = [stub.ok(timeout=2) for stub in stubs[1:]]
            assert 1 + sum(served) <= ACCEPT_LOOPS
            assert not all(served)
            # Close them all: a refused channel keeps reconnecting and would take the place a
            # served one frees before the fresh channel could (the port hashes each new
            # connection to one of the servers, each with its own quarter of the limit).
            for channel in channels:
                channel.close()
            fresh = grpc.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(fresh)
            wait_until(lambda: RawInfo(fresh).ok(timeout=2), "a freed slot was never reused")
        finally:
            for channel in channels:
                channel.close()


def test_an_idle_connection_is_closed_and_the_client_reconnects(
    start_host: Callable[..., ServedHost],
) -> None:
    host = start_host(idle_timeout_s=0.3)
    states: list[grpc.ChannelConnectivity] = []
    idle = threading.Event()
    with grpc.insecure_channel(host.address) as channel:
        stub = RawInfo(channel)
        assert stub.ok()

        def record(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            if grpc.ChannelConnectivity.READY in states and state in (
                grpc.ChannelConnectivity.IDLE,
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            ):
                idle.set()

        channel.subscribe(record)
        assert idle.wait(WAIT_S), states
        assert stub.ok()  # a new connection, transparently
        channel.unsubscribe(record)


class RawInfo:
    def __init__(self, channel: grpc.Channel) -> None:
        self._call = channel.unary_unary(  # type: ignore[call-arg]
            "/framecast.v1.Classifier/GetModelInfo"
        )

    def ok(self, timeout: float = WAIT_S) -> bool:
        try:
            self._call(b"", timeout=timeout)
        except grpc.RpcError:
            return False
        return True


def test_limit_flags_map_onto_the_settings_and_their_help_states_the_defaults() -> None:
    import argparse
    import dataclasses

    from framecast_server.cli_flags import add_limit_arguments
    from framecast_server.cli_settings import limit_settings
    from framecast_server.settings import MIB, ServerSettings

    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)
    args = parser.parse_args(
        [
            "--memory-budget-mb",
            "64",
            "--max-connections",
            "7",
            "--max-streams-per-connection",
            "3",
            "--idle-timeout-s",
            "2.5",
            "--drain-delay-s",
            "1",
            "--grace-s",
            "4",
        ]
    )
    assert limit_settings(args) == {
        "memory_budget_bytes": 64 * MIB,
        "max_connections": 7,
        "max_streams_per_connection": 3,
        "idle_timeout_s": 2.5,
        "drain_delay_s": 1,
        "grace_s": 4,
    }
    assert limit_settings(parser.parse_args([])) == {}
    defaults: dict[str, int | float] = {
        f.name: f.default
        for f in dataclasses.fields(ServerSettings)
        if isinstance(f.default, (int, float))
    }
    helps = {a.dest: a.help or "" for a in parser._actions}
    assert f"(default {defaults['memory_budget_bytes'] // MIB})" in helps["memory_budget_mb"]
    for name in ("max_connections", "max_streams_per_connection", "idle_timeout_s", "grace_s"):
        assert f"(default {defaults[name]:g})" in helps[name], name
    assert f"(default {defaults['drain_delay_s']:g};" in helps["drain_delay_s"]


def test_unary_calls_are_served_on_a_connection_with_two_streams_open(
    start_host: Callable[..., ServedHost],
) -> None:
    # Default limits: a client's long streams leave room for its unary calls on the same
    # connection (at 2 calls per connection, two open streams left none: the calls waited).
    host = start_host()
    with ThreadPoolExecutor(2) as pool:
        raw = RawClassifier(host.address, own_connection=True)
        finish = threading.Event()
        answered = [threading.Event() for _ in range(2)]
        frame = pb.StreamRequest(frame_id=1, image=wire.image_to_proto(random_frames(1)[0]))

        def requests() -> Iterator[bytes]:
            yield frame.SerializeToString()
            finish.wait(WAIT_S)

        def run(i: int) -> int:
            count = 0
            for _ in raw.stream(requests(), timeout=60):
                count += 1
                answered[i].set()
            return count

        streams = [pool.submit(run, i) for i in range(2)]
        for event in answered:
            assert event.wait(WAIT_S), "a stream was not served"
        request = wire.classify_request_bytes(random_frames(1), top_k=1)
        codes = [raw.status("classify", request, timeout=WAIT_S)[0] for _ in range(20)]
        assert codes == [grpc.StatusCode.OK] * 20
        finish.set()
        assert [stream.result(WAIT_S) for stream in streams] == [1, 1]
        raw.close()


@in_process_only(
    "the servers of one process (its accept loops) and their gRPC options; each front end "
    "is such a process, unchanged by the inference mode"
)
def test_every_server_on_the_port_lists_streams_and_ends_connections_at_their_age(
    cache_dir: Path,
) -> None:
    # The kernel spreads connections over the servers sharing the port: each must register
    # Admin.ListStreams and apply --max-connection-age. 4 x ACCEPT_LOOPS connections miss a
    # given server with a probability of (3/4)^16, 1%: a server without them fails this test.
    settings = make_settings(
        cache_dir, backend="null", max_connection_age_s=1.0, max_connection_age_grace_s=0.5
    )
    with BackgroundServer(settings) as server:
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(4 * ACCEPT_LOOPS)
        ]
        ended = [threading.Event() for _ in channels]
        try:
            for channel, end in zip(channels, ended, strict=True):
                list_streams = channel.unary_unary(
                    "/framecast.v1.Admin/ListStreams",
                    request_serializer=pb.ListStreamsRequest.SerializeToString,
                    response_deserializer=pb.ListStreamsResponse.FromString,
                )
                assert list(list_streams(pb.ListStreamsRequest(), timeout=WAIT_S).streams) == []

                def watch(state: grpc.ChannelConnectivity, end: threading.Event = end) -> None:
                    # GOAWAY at the connection's age: the channel leaves READY without a call.
                    if state is not grpc.ChannelConnectivity.READY:
                        end.set()

                channel.subscribe(watch)
            wait_until(
                lambda: all(end.is_set() for end in ended),
                "every connection to end at its maximum age",
                seen=lambda: sum(end.is_set() for end in ended),
            )
        finally:
            for channel in channels:
                channel.close()
