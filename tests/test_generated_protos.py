"""The committed generated code must be what scripts/generate_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "scripts" / "generate_protos.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    module.generate(tmp_path)

    # framecast.v1 in the client, the Open Inference Protocol in framecast-oip, nowhere else.
    assert {str(out) for out in module.OUT_DIRS.values()} == {
        "client/src/framecast_client/_proto",
        "oip/src/framecast_oip/_proto",
    }
    for out in module.OUT_DIRS.values():
        fresh = {p.name: p.read_text() for p in (tmp_path / out).iterdir()}
        committed = {p.name: p.read_text() for p in (ROOT / out).iterdir() if p.is_file()}
        assert fresh.keys() == committed.keys(), out
        stale = [name for name in fresh if fresh[name] != committed[name]]
        assert not stale, (
            f"stale generated code {stale} in {out}: run `uv run python scripts/generate_protos.py`"
        )
