"""EngineSettings validation and the optimization profile it implies."""

from __future__ import annotations

import pytest
from framecast_server.backends.tensorrt import EngineSettings


def test_defaults_profile_is_one_to_max_with_opt_at_max() -> None:
    settings = EngineSettings()
    assert settings.max_batch == 32
    assert settings.profile == (1, 32, 32)
    assert settings.builder_optimization_level == 3
    assert settings.precision == "fp16"


def test_explicit_opt_batch_and_input_shapes() -> None:
    settings = EngineSettings(max_batch=64, opt_batch=16)
    assert settings.profile == (1, 16, 64)
    assert settings.input_shapes() == ((1, 224, 224, 3), (16, 224, 224, 3), (64, 224, 224, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 5000}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"max_batch": 8, "opt_batch": 9}, "opt_batch"),
        ({"opt_batch": 0}, "opt_batch"),
        ({"workspace_bytes": 0}, "workspace_bytes"),
        ({"builder_optimization_level": 6}, "builder_optimization_level"),
        ({"builder_optimization_level": -1}, "builder_optimization_level"),
        ({"precision": "fp32"}, "precision"),
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineSettings(**kwargs)  # type: ignore[arg-type]
