"""The layers a newcomer sees from the folders hold: checked on the import statements."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client" / "src" / "framecast_client"
SERVER = ROOT / "server" / "src" / "framecast_server"
# The server's core: model building, backends, batcher. Only service/, app and the CLI speak gRPC.
CORE = [
    SERVER / "model",
    SERVER / "backends",
    SERVER / "batcher.py",
    SERVER / "topk.py",
    SERVER / "runtime.py",
    SERVER / "settings.py",
]


def imports(path: Path) -> Iterator[tuple[Path, str]]:
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield file, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield file, node.module


def test_client_imports_nothing_of_the_server() -> None:
    offenders = [(f, m) for f, m in imports(CLIENT) if m.split(".")[0] == "framecast_server"]
    assert not offenders


def test_server_core_never_imports_grpc() -> None:
    offenders = [
        (str(f.relative_to(ROOT)), m)
        for part in CORE
        for f, m in imports(part)
        if m.split(".")[0] in {"grpc", "grpc_health", "grpc_reflection"}
        or m.startswith("framecast_client")
    ]
    assert not offenders


def test_client_depends_only_on_its_four_libraries() -> None:
    allowed = {"grpc", "google", "numpy", "PIL", "framecast_client", "typing_extensions"}
    optional = {"av", "matplotlib"}  # the camera and plot extras, imported lazily
    stdlib = __import__("sys").stdlib_module_names
    third_party = {m.split(".")[0] for _, m in imports(CLIENT) if m.split(".")[0] not in stdlib}
    assert third_party <= allowed | optional


def test_each_protocol_is_its_own_servicer_module() -> None:
    """Servicers share the core and the one error mapping, never each other."""
    service = SERVER / "service"
    servicers = {"classifier", "inference_protocol"}
    offenders = [
        (f.name, m)
        for name in servicers
        for f, m in imports(service / f"{name}.py")
        if m.rsplit(".", 1)[-1] in servicers - {name}
    ]
    relative = [
        (name, node.module)
        for name in servicers
        for node in ast.walk(ast.parse((service / f"{name}.py").read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.level > 0
        and (node.module or "").split(".")[-1] in servicers - {name}
    ]
    assert not offenders
    assert not relative
