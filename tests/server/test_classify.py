"""Classify and GetModelInfo through a real server, checked against the backend run directly."""

from __future__ import annotations

import numpy as np
import pytest
from framecast_client import AsyncClient, Client, preprocess
from framecast_server.backends.onnxruntime import OnnxRuntimeBackend
from framecast_server.process.background import BackgroundServer
from support import random_frames


def test_model_info_describes_the_model(client: Client) -> None:
    info = client.model_info()
    assert info.name == "resnet50-random"
    assert info.backend == "onnxruntime"
    assert info.precision == "fp32"
    assert info.max_batch == 8
    assert len(info.labels) == 1000
    assert info.labels[281] == "tabby"
    assert info.preprocessing.input_height == info.preprocessing.input_width == 224
    assert info.preprocessing.resize_policy == "shorter_side_then_center_crop"
    # Offline, the default model falls back to random weights, and says so.
    assert not info.pretrained
    assert "RANDOM WEIGHTS" in info.warning
    assert info.max_message_bytes >= 8 * 224 * 224 * 3


def test_results_match_the_backend_run_directly(
    client: Client, onnx_server: BackgroundServer
) -> None:
    frames = random_frames(5, seed=7)
    serving = onnx_server.serving
    assert serving is not None
    backend = OnnxRuntimeBackend(serving.model.onnx_path, max_batch=8)
    expected = backend.infer(frames)

    results = client.classify_preprocessed(frames, top_k=5)

    assert len(results) == 5
    for result, probabilities in zip(results, expected, strict=True):
        # Random weights can saturate the softmax, so classes may tie: check values, and that
        # each returned class really has the probability returned for it.
        indices = [p.index for p in result.predictions]
        got = np.array([p.probability for p in result.predictions])
        np.testing.assert_allclose(got, np.sort(probabilities)[::-1][:5], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got, probabilities[indices], rtol=1e-4, atol=1e-6)
        assert indices[0] == int(np.argmax(probabilities))
        assert len(set(indices)) == 5
        assert [p.label for p in result.predictions] == [serving.model.labels[i] for i in indices]
        assert result.timing is not None
        assert 1 <= result.timing.batch_size <= 8
        assert result.timing.compute_ms > 0


def test_classify_preprocesses_as_the_server_says(client: Client) -> None:
    frame = random_frames(1, seed=5, size=300)[0]
    spec = client.model_info().preprocessing
    expected = client.classify_preprocessed(preprocess(frame, spec)[None], top_k=3)[0]
    assert client.classify(frame, top_k=3).predictions == expected.predictions


def test_single_image_returns_one_result_and_default_top_k(client: Client) -> None:
    result = client.classify(random_frames(1)[0])
    assert len(result.predictions) == 5
    probabilities = [p.probability for p in result.predictions]
    assert probabilities == sorted(probabilities, reverse=True)


def test_more_images_than_max_batch_are_split_by_the_client(client: Client) -> None:
    frames = random_frames(19, seed=3)
    results = client.classify_preprocessed(frames, top_k=1)
    one_by_one = [client.classify_preprocessed(frames[[i]], top_k=1)[0] for i in (0, 9, 18)]
    assert len(results) == 19
    assert [results[i].top.index for i in (0, 9, 18)] == [r.top.index for r in one_by_one]


@pytest.mark.asyncio
async def test_async_client_has_the_same_results(
    client: Client, onnx_server: BackgroundServer
) -> None:
    frames = list(random_frames(3, seed=11))
    expected = client.classify(frames, top_k=3)
    async with AsyncClient(onnx_server.address, timeout=60.0) as aclient:
        got = await aclient.classify(frames, top_k=3)
        info = await aclient.model_info()
    assert [r.predictions for r in got] == [r.predictions for r in expected]
    assert info == client.model_info()
