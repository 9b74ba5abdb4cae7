"""The builder against a fake TensorRT: flags per version, profile, limits, timing cache."""

from __future__ import annotations

import sys
from typing import Any

import onnx
import pytest
from framecast_server.backends.tensorrt import EngineSettings
from framecast_server.backends.tensorrt.builder import (
    build_plan,
    combine_timing_caches,
    network_creation_flags,
    tensorrt_major,
)
from framecast_server.backends.tensorrt.errors import (
    EngineBuildError,
    EngineMismatchError,
    OnnxParseError,
)
from framecast_server.backends.tensorrt.trt_logging import process_logger
from onnx import TensorProto

from .trt_fakes import make_fake_trt


def test_tensorrt_major() -> None:
    assert tensorrt_major("10.13.0.35") == 10
    assert tensorrt_major("11.0.0") == 11
    with pytest.raises(EngineBuildError):
        tensorrt_major("dev")


def test_10x_sets_strongly_typed_flag() -> None:
    assert network_creation_flags(make_fake_trt("10.3.0.30")) == 1 << 1


def test_11x_needs_no_flag() -> None:
    # On 11.x every network is strongly typed; STRONGLY_TYPED is deprecated (and renumbered).
    assert network_creation_flags(make_fake_trt("11.2.0.1")) == 0


def test_11x_fake_has_only_the_flags_11x_has() -> None:
    fake = make_fake_trt("11.4.0.106")
    assert not hasattr(fake.BuilderFlag, "FP16")
    assert not hasattr(fake.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
    assert not hasattr(fake.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert hasattr(make_fake_trt("10.13.0.35").BuilderFlag, "FP16")


def test_10x_without_strongly_typed_is_refused() -> None:
    with pytest.raises(EngineBuildError, match="STRONGLY_TYPED"):
        network_creation_flags(make_fake_trt("10.0.0.6", strongly_typed_flag=False))


def test_pre_10_is_refused() -> None:
    with pytest.raises(EngineBuildError, match="not supported"):
        network_creation_flags(make_fake_trt("8.6.1.6"))


def _build(fake_trt: Any, model: onnx.ModelProto, **kwargs: Any) -> Any:
    return build_plan(model, EngineSettings(**kwargs), timing_cache=b"old-timings")


def test_build_configures_profile_limits_and_timing_cache(
    fake_trt: Any, tiny_model: onnx.ModelProto
) -> None:
    result = build_plan(
        tiny_model,
        EngineSettings(
            max_batch=64, opt_batch=16, workspace_bytes=123 << 20, builder_optimization_level=4
        ),
        timing_cache=b"old-timings",
    )
    (_, flags), (_, network, config) = fake_trt.events
    assert flags == 1 << 1 == network.flags
    (profile,) = config.profiles
    assert profile.shapes == {"images": ([1, 224, 224, 3], [16, 224, 224, 3], [64, 224, 224, 3])}
    assert config.pools == {"WORKSPACE": 123 << 20}
    assert config.builder_optimization_level == 4
    assert config.profiling_verbosity is fake_trt.ProfilingVerbosity.DETAILED
    assert config.progress_monitor is not None
    assert result.timing_cache == b"old-timings+timed"
    assert result.plan.startswith(b"PLAN")
    # Precision lives in the graph: the parser was given the fp16 model, I/O types kept.
    parsed = fake_trt.parsed_model
    assert parsed.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert parsed.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.data_type for i in parsed.graph.initializer} == {TensorProto.FLOAT16}
    # No precision builder flags: 11.x has none, and on 10.x they would mean weak typing.
    assert config.flags == set()


def test_first_build_starts_with_empty_timing_cache(
    fake_trt: Any, tiny_model: onnx.ModelProto
) -> None:
    result = build_plan(tiny_model, EngineSettings(), timing_cache=None)
    assert result.timing_cache == b"+timed"


def test_unreadable_stored_timing_cache_falls_back_to_an_empty_one(
    fake_trt: Any, tiny_model: onnx.ModelProto, caplog: pytest.LogCaptureFixture
) -> None:
    fake_trt.timing_cache_unreadable = True
    result = build_plan(tiny_model, EngineSettings(), timing_cache=b"from another TensorRT")
    assert result.timing_cache == b"+timed"
    assert "stored TensorRT timing cache (21 bytes) unusable" in caplog.text


def test_build_goes_on_without_any_timing_cache(
    fake_trt: Any, tiny_model: onnx.ModelProto, caplog: pytest.LogCaptureFixture
) -> None:
    fake_trt.no_timing_cache = True
    result = build_plan(tiny_model, EngineSettings(), timing_cache=b"old")
    assert result.plan.startswith(b"PLAN")
    assert result.timing_cache is None
    assert "could not create a timing cache; building without one" in caplog.text


def test_timing_caches_are_combined(fake_trt: Any) -> None:
    assert combine_timing_caches(b"disk", b"new") == b"disk&new+timed"


def test_builder_and_parser_share_the_process_logger(
    fake_trt: Any, tiny_model: onnx.ModelProto
) -> None:
    build_plan(tiny_model, EngineSettings(), timing_cache=None)
    build_plan(tiny_model, EngineSettings(), timing_cache=None)
    assert [kind for kind, _ in fake_trt.created] == ["Builder", "OnnxParser"] * 2
    assert fake_trt.ignored_loggers == []
    assert fake_trt.first_logger is process_logger()


def test_parser_errors_carry_their_descriptions(fake_trt: Any, tiny_model: onnx.ModelProto) -> None:
    fake_trt.parser_errors = [
        ("conv", "Conv", "Unsupported weights type"),
        ("fc", "Gemm", "Invalid shape"),
    ]
    with pytest.raises(OnnxParseError) as info:
        build_plan(tiny_model, EngineSettings(), timing_cache=None)
    assert info.value.call == "OnnxParser.parse"
    assert info.value.errors == [
        "node conv Conv: Unsupported weights type (code UNSUPPORTED_NODE)",
        "node fc Gemm: Invalid shape (code UNSUPPORTED_NODE)",
    ]
    assert "Unsupported weights type" in str(info.value)


def test_failed_build_is_a_typed_error(fake_trt: Any, tiny_model: onnx.ModelProto) -> None:
    fake_trt.fail_build = True
    with pytest.raises(EngineBuildError) as info:
        build_plan(tiny_model, EngineSettings(), timing_cache=None)
    assert info.value.call == "Builder.build_serialized_network"


def test_wrong_io_contract_is_refused(fake_trt: Any, tiny_model: onnx.ModelProto) -> None:
    tiny_model.graph.output[0].name = "logits_out"
    tiny_model.graph.node[-1].output[0] = "logits_out"
    with pytest.raises(EngineMismatchError, match="probabilities"):
        build_plan(tiny_model, EngineSettings(), timing_cache=None)


def test_11x_build_uses_no_creation_flags(
    monkeypatch: pytest.MonkeyPatch, tiny_model: onnx.ModelProto
) -> None:
    fake = make_fake_trt("11.1.0.7")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    build_plan(tiny_model, EngineSettings(), timing_cache=None)
    assert fake.events[0] == ("create_network", 0)
