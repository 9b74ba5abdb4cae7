"""The layers a newcomer sees from the folders hold: checked on the import statements."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client" / "src" / "framecast_client"
SERVER = ROOT / "server" / "src" / "framecast_server"
BENCH = ROOT / "bench" / "src" / "framecast_bench"
# The server's core: model building, backends, batching, admission, the drain. Only service/,
# security/, process/ and the CLI speak gRPC.
CORE = [
    SERVER / "model",
    SERVER / "backends",
    SERVER / "core",
    SERVER / "settings.py",
]
# The server's folders, from the bottom up: a folder imports only folders to its left.
# Interceptors (security/, metrics/) stand in front of the servicers, so they sit above service/.
LAYERS = ["model", "backends", "core", "service", "security", "metrics", "process"]


def imports(path: Path) -> Iterator[tuple[Path, str]]:
    """Every module each file imports, relative imports resolved to absolute names."""
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield file, alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield file, node.module
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                parts = file.relative_to(ROOT).parts
                package = list(parts[parts.index("src") + 1 : -1])
                base = package[: len(package) - node.level + 1]
                yield file, ".".join(base + ([node.module] if node.module else []))


def test_client_imports_nothing_of_the_server() -> None:
    offenders = [(f, m) for f, m in imports(CLIENT) if m.split(".")[0] == "framecast_server"]
    assert not offenders


def test_the_bench_stands_beside_the_sdk_not_on_the_server() -> None:
    """framecast-bench installs without the server; the SDK never carries the bench."""
    assert not (CLIENT / "bench").exists()
    offenders = [(f, m) for f, m in imports(CLIENT) if m.split(".")[0] == "framecast_bench"]
    offenders += [(f, m) for f, m in imports(BENCH) if m.split(".")[0] == "framecast_server"]
    assert not offenders
    allowed = {"grpc", "google", "numpy", "framecast_client", "framecast_bench", "framecast_oip"}
    optional = {"av", "matplotlib"}  # the video and plot extras, imported lazily
    stdlib = __import__("sys").stdlib_module_names
    third_party = {m.split(".")[0] for _, m in imports(BENCH) if m.split(".")[0] not in stdlib}
    assert third_party <= allowed | optional


# What the server may take from the client distribution: the wire format both ends share. A
# frame's walk from the servicers to the backend and back stays inside the server package.
SHARED_WIRE_FORMAT = ("framecast_client._proto", "framecast_client.wire_format")
OIP = ROOT / "oip" / "src" / "framecast_oip"
# The server's CLI adds commands to the client's `framecast` (with its flag types) and runs a
# client in `demo`.
SERVER_CLI = (SERVER / "cli.py", SERVER / "cli_flags.py")


def test_the_server_takes_only_the_shared_wire_format_from_the_client() -> None:
    offenders = [
        (str(f.relative_to(ROOT)), m)
        for f, m in imports(SERVER)
        if f not in SERVER_CLI
        and m.split(".")[0] == "framecast_client"
        and not m.startswith(SHARED_WIRE_FORMAT)
    ]
    assert not offenders


def test_the_sdk_carries_no_open_inference_protocol() -> None:
    """The server and the bench speak it, from framecast-oip; the SDK never does."""
    assert not (CLIENT / "oip.py").exists()
    assert not list(CLIENT.rglob("open_inference*"))
    assert list(OIP.rglob("open_inference_pb2*.py"))
    offenders = [(f, m) for f, m in imports(CLIENT) if m.split(".")[0] == "framecast_oip"]
    offenders += [
        (f, m)
        for f, m in imports(OIP)
        if m.split(".")[0].startswith("framecast") and m.split(".")[0] != "framecast_oip"
    ]
    assert not offenders


def test_the_shared_wire_format_imports_nothing_of_either_side() -> None:
    module = CLIENT / "wire_format.py"
    relative = [
        node.module
        for node in ast.walk(ast.parse(module.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == ["_proto"]
    stdlib = __import__("sys").stdlib_module_names
    outside = {m for _, m in imports(module) if m.split(".")[0] not in stdlib}
    assert outside == {"framecast_client._proto"}


def test_imports_resolve_relative_ones() -> None:
    """The checks below see `from ..x import y` too, not only absolute imports."""
    assert "framecast_server.core.batcher" in {m for _, m in imports(SERVER / "process" / "app.py")}


def test_server_folders_import_only_folders_below_them() -> None:
    """model < backends < core < service < security < metrics < process: no arrow points up."""
    offenders = []
    for rank, layer in enumerate(LAYERS):
        above = set(LAYERS[rank + 1 :])
        for f, m in imports(SERVER / layer):
            parts = m.split(".")
            if parts[0] == "framecast_server" and len(parts) > 1 and parts[1] in above:
                offenders.append((str(f.relative_to(ROOT)), m))
    assert not offenders


def test_server_core_never_imports_grpc() -> None:
    offenders = [
        (str(f.relative_to(ROOT)), m)
        for part in CORE
        for f, m in imports(part)
        if m.split(".")[0] in {"grpc", "grpc_health", "grpc_reflection", "prometheus_client"}
        or m.startswith("framecast_client")
    ]
    assert not offenders


def test_only_the_metrics_exporter_imports_prometheus() -> None:
    # One room for metrics: the app, the wiring and the workers' supervisor go through metrics/.
    offenders = [
        str(f.relative_to(ROOT))
        for f, m in imports(SERVER)
        if m.split(".")[0] == "prometheus_client" and (SERVER / "metrics") not in f.parents
    ]
    assert not offenders


def test_client_depends_only_on_its_four_libraries() -> None:
    allowed = {"grpc", "google", "numpy", "PIL", "framecast_client", "typing_extensions"}
    optional = {"av"}  # the camera extra, imported lazily
    stdlib = __import__("sys").stdlib_module_names
    third_party = {m.split(".")[0] for _, m in imports(CLIENT) if m.split(".")[0] not in stdlib}
    assert third_party <= allowed | optional


def test_servicers_never_look_at_credentials_or_metrics_libraries() -> None:
    # Auth is an interceptor, metrics an exporter fed through the Recorder interface.
    for file in (SERVER / "service").rglob("*.py"):
        text = file.read_text().lower()
        for word in ("authorization", "peer_identities", "auth_context", "prometheus", "..auth"):
            assert word not in text, f"{file.relative_to(ROOT)} mentions {word}"


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
