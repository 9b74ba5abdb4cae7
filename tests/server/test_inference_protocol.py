"""The Open Inference Protocol endpoint, driven by Triton's own client (tritonclient[grpc])."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from framecast_client import Client
from framecast_oip._proto import open_inference_pb2 as pb
from framecast_oip._proto import open_inference_pb2_grpc as pb_grpc
from framecast_server.process.background import BackgroundServer
from support import (
    HOST_KINDS,
    HoldableNullBackend,
    ServedHost,
    in_process_only,
    make_settings,
    random_frames,
    served_host,
    wait_until,
)
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.utils import InferenceServerException

MODEL = "resnet50"


@pytest.fixture(scope="module", params=HOST_KINDS)
def null_server(
    request: pytest.FixtureRequest, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedHost]:
    """A real server on the null backend: cheap, and its answers are known from each frame.

    Each test using it runs twice: in process, and against `serve --workers 2 --inference
    shared` (the protocol's calls served by the front ends, the frames by one inference
    process).
    """
    with served_host(request.param, cache_dir, tmp_path_factory.mktemp("oip"), max_batch=8) as host:
        yield host


@pytest.fixture
def triton_client(onnx_server: BackgroundServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(onnx_server.address) as client:
        yield client


@pytest.fixture
def null_client(null_server: ServedHost) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(null_server.address) as client:
        yield client


def images_input(frames: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("images", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames)
    return tensor


def keyed_frames(keys: list[int]) -> np.ndarray:
    """Frames whose first byte is their key: the null backend's top class is key % 1000."""
    frames = random_frames(len(keys), seed=len(keys))
    frames[:, 0, 0, 0] = keys
    return frames


def status_of(error: InferenceServerException) -> str:
    return str(error.status())


# ---------------------------------------------------------------- readiness and metadata
def test_readiness(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert not triton_client.is_model_ready("no-such-model")
    assert not triton_client.is_model_ready(MODEL, model_version="no-such-version")


def test_server_metadata_advertises_the_extensions(
    triton_client: triton.InferenceServerClient,
) -> None:
    meta = triton_client.get_server_metadata()
    assert meta.name == "framecast"
    assert meta.version
    assert {"classification", "model_configuration", "statistics"} <= set(meta.extensions)


def test_model_metadata_names_shapes_and_preprocessing(
    triton_client: triton.InferenceServerClient, onnx_server: BackgroundServer
) -> None:
    meta = triton_client.get_model_metadata(MODEL)
    assert onnx_server.serving is not None
    assert meta.name == MODEL
    assert list(meta.versions) == [onnx_server.serving.model.version]
    (inp,) = meta.inputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("images", "UINT8", [-1, 224, 224, 3])
    (out,) = meta.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [-1, 1000])
    # tritonclient's messages skip KServe's properties; read them with our own stubs.
    with grpc.insecure_channel(onnx_server.address) as channel:
        ours = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=MODEL), timeout=10
        )
    preset = onnx_server.serving.model.preset
    assert ours.properties["resize_policy"] == preset.resize_policy
    assert ours.properties["resize_size"] == str(preset.resize_size)
    assert ours.properties["crop_size"] == "224"


def test_model_config_has_what_perf_analyzer_reads(
    triton_client: triton.InferenceServerClient,
) -> None:
    config = triton_client.get_model_config(MODEL).config
    assert config.name == MODEL
    assert config.max_batch_size == 8
    (inp,) = config.input
    assert inp.name == "images"
    assert inp.data_type == triton_pb.model__config__pb2.TYPE_UINT8
    assert list(inp.dims) == [224, 224, 3]
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == (
        "probabilities",
        triton_pb.model__config__pb2.TYPE_FP32,
        [1000],
    )
    assert config.HasField("dynamic_batching")


# ---------------------------------------------------------------- inference
def test_raw_uint8_batch_equals_our_classify(
    triton_client: triton.InferenceServerClient, client: Client
) -> None:
    frames = random_frames(3, seed=13)
    result = triton_client.infer(
        MODEL, [images_input(frames)], outputs=[triton.InferRequestedOutput("probabilities")]
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (3, 1000)
    ours = client.classify_preprocessed(frames, top_k=5)
    for row, classification in zip(probabilities, ours, strict=True):
        best = np.argsort(row)[::-1][:5]
        assert [p.index for p in classification.predictions] == best.tolist()
        assert [p.probability for p in classification.predictions] == row[best].tolist()


def test_all_outputs_when_none_requested_and_the_request_id_echoed(
    null_client: triton.InferenceServerClient,
) -> None:
    result = null_client.infer(MODEL, [images_input(keyed_frames([7, 9]))], request_id="req-42")
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_name == MODEL
    assert result.as_numpy("probabilities").argmax(axis=1).tolist() == [7, 9]


def test_classification_extension_equals_our_classify(
    triton_client: triton.InferenceServerClient, client: Client
) -> None:
    frames = random_frames(2, seed=5)
    result = triton_client.infer(
        MODEL,
        [images_input(frames)],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    ours = client.classify_preprocessed(frames, top_k=3)
    for row, classification in zip(classes, ours, strict=True):
        parsed = [element.decode().split(":", 2) for element in row]
        assert [int(i) for _, i, _ in parsed] == [p.index for p in classification.predictions]
        assert [label for _, _, label in parsed] == [p.label for p in classification.predictions]
        expected = [f"{p.probability:f}" for p in classification.predictions]
        assert [value for value, _, _ in parsed] == expected


def test_typed_uint_contents_are_accepted(null_server: ServedHost) -> None:
    frames = keyed_frames([200])
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=frames.shape)
    tensor.contents.uint_contents.extend(frames.ravel().tolist())
    with grpc.insecure_channel(null_server.address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    assert int(probabilities.argmax()) == 200


# ---------------------------------------------------------------- streaming
def test_stream_many_in_flight_answers_every_request_in_order(
    null_client: triton.InferenceServerClient,
) -> None:
    count = 300
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    null_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(count):
            null_client.async_stream_infer(
                MODEL,
                [images_input(keyed_frames([i % 256]))],
                request_id=str(i),
                outputs=[triton.InferRequestedOutput("probabilities", class_count=1)],
            )
        received = [results.get(timeout=30) for _ in range(count)]
    finally:
        null_client.stop_stream()
    assert all(error is None for _, error in received)
    ids = [int(result.get_response().id) for result, _ in received]
    assert ids == list(range(count))
    tops = [int(result.as_numpy("probabilities")[0, 0].split(b":")[1]) for result, _ in received]
    assert tops == [i % 256 for i in range(count)]


def test_tritonclients_streaming_and_inferring_on_one_connection_at_default_settings(
    start_host: Callable[..., ServedHost],
) -> None:
    # Two tritonclient clients in one process share one connection (gRPC's subchannel pool);
    # each holds a stream open and infers beside it, as perf_analyzer's do. At 2 calls per
    # connection the two streams took every place and the infer calls never started.
    server = start_host(max_batch=8)
    with (
        triton.InferenceServerClient(server.address) as first,
        triton.InferenceServerClient(server.address) as second,
    ):
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        for client in (first, second):
            client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            for n, client in enumerate((first, second)):
                client.async_stream_infer(
                    MODEL, [images_input(keyed_frames([n]))], request_id=str(n)
                )
            streamed = [results.get(timeout=30) for _ in range(2)]
            assert all(error is None for _, error in streamed)
            for client in (first, second):
                for key in (3, 4, 5):
                    result = client.infer(
                        MODEL,
                        [images_input(keyed_frames([key]))],
                        outputs=[triton.InferRequestedOutput("probabilities", class_count=1)],
                        client_timeout=30,
                    )
                    assert int(result.as_numpy("probabilities")[0, 0].split(b":")[1]) == key
        finally:
            for client in (first, second):
                client.stop_stream()


@in_process_only(
    "waits on one server's refusal counter; the same flow control of ModelStreamInfer runs "
    "against the shared host in test_limits.py (the memory budget)"
)
def test_a_stream_beyond_a_full_queue_waits_for_room_instead_of_failing(cache_dir: Path) -> None:
    # As ClassifyStream: a full server stops reading the stream (flow control), it refuses
    # none of its requests.
    backend = HoldableNullBackend()
    settings = make_settings(cache_dir, backend="null", max_batch=4, max_queue=8)
    count = 40
    with (
        BackgroundServer(settings, backend_factory=lambda _: backend) as server,
        triton.InferenceServerClient(server.address) as client,
    ):
        serving = server.serving
        assert serving is not None
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        backend.hold()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            for i in range(count):
                client.async_stream_infer(
                    MODEL, [images_input(keyed_frames([i]))], request_id=str(i)
                )
            assert backend.entered.wait(30)
            # The queue is full once the stream's next request found no room.
            wait_until(lambda: serving.batcher.stats.rejected_full > 0, "the queue to fill",
                       seen=lambda: serving.batcher.stats)  # fmt: skip
            backend.release()
            received = [results.get(timeout=30) for _ in range(count)]
        finally:
            backend.release()
            client.stop_stream()
    assert [error for _, error in received] == [None] * count
    assert [result.get_response().id for result, _ in received] == [str(i) for i in range(count)]


def test_stream_reports_a_bad_request_and_goes_on(
    null_client: triton.InferenceServerClient,
) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    null_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        null_client.async_stream_infer(MODEL, [images_input(keyed_frames([1]))], request_id="a")
        null_client.async_stream_infer(
            "other-model", [images_input(keyed_frames([2]))], request_id="b"
        )
        null_client.async_stream_infer(MODEL, [images_input(keyed_frames([3]))], request_id="c")
        received = [results.get(timeout=30) for _ in range(3)]
    finally:
        null_client.stop_stream()
    (first, e1), (_, e2), (third, e3) = received
    assert e1 is None
    assert e3 is None
    assert isinstance(e2, InferenceServerException)
    assert "unknown model 'other-model'" in e2.message()
    assert first.get_response().id == "a"
    assert third.get_response().id == "c"
    assert int(third.as_numpy("probabilities").argmax()) == 3


# ---------------------------------------------------------------- errors
def _infer_error(client: triton.InferenceServerClient, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(**kwargs)
    return caught.value


@pytest.mark.parametrize(
    ("kwargs", "status", "text"),
    [
        ({"model_name": "vgg16"}, "NOT_FOUND", "unknown model 'vgg16'"),
        ({"model_version": "7"}, "NOT_FOUND", "no version '7'"),
        (
            {"outputs": [triton.InferRequestedOutput("logits")]},
            "INVALID_ARGUMENT",
            "unknown output 'logits'",
        ),
        (
            {"outputs": [triton.InferRequestedOutput("probabilities", class_count=1001)]},
            "INVALID_ARGUMENT",
            "classification must be between 1 and 1000",
        ),
    ],
)
def test_request_errors(
    null_client: triton.InferenceServerClient, kwargs: dict[str, Any], status: str, text: str
) -> None:
    arguments = {"model_name": MODEL, "inputs": [images_input(keyed_frames([1]))], **kwargs}
    error = _infer_error(null_client, **arguments)
    assert status_of(error) == f"StatusCode.{status}"
    assert text in error.message()
    assert null_client.is_server_ready()  # and the server keeps serving


def test_wrong_datatype_shape_and_batch_are_invalid_arguments(
    null_client: triton.InferenceServerClient,
) -> None:
    floats = triton.InferInput("images", [1, 224, 224, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 224, 224, 3), dtype=np.float32))
    small = images_input(random_frames(1, size=100))
    too_many = images_input(random_frames(9))
    wrong_name = triton.InferInput("pixels", [1, 224, 224, 3], "UINT8")
    wrong_name.set_data_from_numpy(random_frames(1))
    for tensor, text in (
        (floats, "must be UINT8"),
        (small, "[N, 224, 224, 3]"),
        (too_many, "1 to 8 per request"),
        (wrong_name, "one input named 'images'"),
    ):
        error = _infer_error(null_client, model_name=MODEL, inputs=[tensor])
        assert status_of(error) == "StatusCode.INVALID_ARGUMENT", error
        assert text in error.message()


def test_byte_count_must_match_the_shape(null_server: ServedHost) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8", shape=[2, 224, 224, 3])
    request.raw_input_contents.append(random_frames(1).tobytes())
    with grpc.insecure_channel(null_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "carries 150528 bytes" in str(caught.value.details())


def test_metadata_of_an_unknown_model_is_not_found(
    null_client: triton.InferenceServerClient,
) -> None:
    for call in (null_client.get_model_metadata, null_client.get_model_config):
        with pytest.raises(InferenceServerException) as caught:
            call("vgg16")
        assert status_of(caught.value) == "StatusCode.NOT_FOUND"


@in_process_only("an in-process server started without loading its model")
def test_not_ready_before_the_model_is_loaded(cache_dir: Path) -> None:
    settings = make_settings(cache_dir, backend="null")
    with (
        BackgroundServer(settings, load=False) as server,
        triton.InferenceServerClient(server.address) as client,
    ):
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready(MODEL)
        error = _infer_error(client, model_name=MODEL, inputs=[images_input(random_frames(1))])
        assert status_of(error) == "StatusCode.UNAVAILABLE"


# ---------------------------------------------------------------- statistics and perf_analyzer
def test_statistics_count_what_the_batcher_ran(
    null_client: triton.InferenceServerClient, null_server: ServedHost
) -> None:
    def stats() -> Any:
        (model,) = null_client.get_inference_statistics(MODEL).model_stats
        return model

    before = stats()
    null_client.infer(MODEL, [images_input(keyed_frames([1, 2, 3]))])
    after = stats()
    assert after.name == MODEL
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    success = after.inference_stats.success
    assert success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.last_inference >= before.last_inference > 0


def test_perf_analyzer_start_up_calls(null_client: triton.InferenceServerClient) -> None:
    """The calls perf_analyzer makes before it sends load, with the answers it relies on."""
    server = null_client.get_server_metadata()
    assert server.name
    assert server.version
    meta = null_client.get_model_metadata(MODEL, model_version="")
    config = null_client.get_model_config(MODEL, model_version="").config
    # perf_analyzer derives its input data from these: batch dimension in metadata, not in dims.
    assert list(meta.inputs[0].shape) == [-1, *config.input[0].dims]
    assert config.max_batch_size > 0
    assert config.platform
    assert config.backend
    assert not config.HasField("sequence_batching")
    assert not config.HasField("ensemble_scheduling")
    (model,) = null_client.get_inference_statistics(MODEL, model_version="").model_stats
    assert model.version == meta.versions[0]


# ---------------------------------------------------------------- the wire format itself
def test_every_field_matches_tritons_definition() -> None:
    """Our .proto was written from the specification: its numbers and types are Triton's."""
    ours = pb.DESCRIPTOR
    checked = 0

    def compare(mine: Any, theirs: Any) -> None:
        nonlocal checked
        for field in mine.fields:
            other = theirs.fields_by_name.get(field.name)
            if other is None:  # KServe's additions Triton lacks (ModelMetadata properties)
                assert field.full_name == "inference.ModelMetadataResponse.properties"
                continue
            assert (field.number, field.type, field.is_repeated) == (
                other.number,
                other.type,
                other.is_repeated,
            ), field.full_name
            checked += 1
        for nested in mine.nested_types:
            if nested.name == "PropertiesEntry":  # the map entry of that addition
                continue
            compare(nested, theirs.nested_types_by_name[nested.name])

    pools = (triton_pb.DESCRIPTOR, triton_pb.model__config__pb2.DESCRIPTOR)
    for message in ours.message_types_by_name.values():
        theirs = next(
            p.message_types_by_name[message.name]
            for p in pools
            if message.name in p.message_types_by_name
        )
        compare(message, theirs)
    service = ours.services_by_name["GRPCInferenceService"]
    their_service = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = their_service.methods_by_name[method.name]
        assert method.input_type.name == other.input_type.name
        assert method.output_type.name == other.output_type.name
        assert method.client_streaming == other.client_streaming
    assert checked > 80


def test_a_stream_closed_by_the_client_leaves_the_server_serving(
    null_server: ServedHost,
) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 224, 224, 3])
    request.raw_input_contents.append(keyed_frames([4]).tobytes())
    with grpc.insecure_channel(null_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # Requests still on their way in and answers still on their way out when it is cut.
        call = stub.ModelStreamInfer(iter([request] * 50), timeout=30)
        assert next(iter(call)).infer_response.model_name == MODEL
        call.cancel()  # type: ignore[no-untyped-call]
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        response = stub.ModelInfer(request, timeout=10)
    assert int(np.frombuffer(response.raw_output_contents[0], dtype="<f4").argmax()) == 4


def test_reflection_describes_the_inference_service(null_server: ServedHost) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.ModelInferRequest"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="framecast.v1.Classifier"),
    ]
    with grpc.insecure_channel(null_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed, inference_file, classifier_file = stub.ServerReflectionInfo(
            iter(requests), timeout=10
        )
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "framecast.v1.Classifier"} <= names
    assert inference_file.file_descriptor_response.file_descriptor_proto
    assert classifier_file.file_descriptor_response.file_descriptor_proto


def test_the_timeout_parameter_drops_a_request_that_waits_too_long(
    start_host: Callable[..., ServedHost],
) -> None:
    """Triton's `timeout` request parameter (microseconds) is a deadline in the batcher (in
    shared mode, the inference process's)."""
    host = start_host(max_batch=1)
    with (
        triton.InferenceServerClient(host.address) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        host.hold()
        running = pool.submit(client.infer, MODEL, [images_input(keyed_frames([1]))])
        assert host.wait_entered(10)  # the first request holds the backend
        error = _infer_error(
            client, model_name=MODEL, inputs=[images_input(keyed_frames([2]))], timeout=50_000
        )
        host.release()
        assert status_of(error) == "StatusCode.DEADLINE_EXCEEDED"
        assert int(running.result(timeout=30).as_numpy("probabilities").argmax()) == 1


def test_a_timeout_parameter_must_be_an_integer(null_server: ServedHost) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 224, 224, 3])
    request.raw_input_contents.append(random_frames(1).tobytes())
    request.parameters["timeout"].string_param = "soon"
    with grpc.insecure_channel(null_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout parameter must be an integer" in str(caught.value.details())


def test_statistics_of_every_model_and_of_an_unknown_one(
    null_client: triton.InferenceServerClient,
) -> None:
    (model,) = null_client.get_inference_statistics("").model_stats  # "": every model
    assert model.name == MODEL
    with pytest.raises(InferenceServerException) as caught:
        null_client.get_inference_statistics("vgg16")
    assert status_of(caught.value) == "StatusCode.NOT_FOUND"
