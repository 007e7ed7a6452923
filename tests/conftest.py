import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The dtype policy picks bf16 on CPUs with AVX512-BF16 / AMX: pin fp32 so that exact-value tests mean
# the same on every machine (tests of bf16 itself pass their dtype; POLYALIGN_DTYPE=auto restores
# the policy). Subprocesses (the CLI tests) inherit it.
os.environ.setdefault("POLYALIGN_DTYPE", "float32")


def require_shared(path: Path, env: dict[str, str]) -> Path:
    """``path`` if it exists; otherwise skip locally but FAIL under ``CI=true``: CI must not turn
    every data test into a silent skip because ../shared was not laid next to the clone."""
    if not path.exists():
        message = f"shared data not found at {path} (set POLYALIGN_SHARED_DATA)"
        if env.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {message}; data tests must run in CI", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return require_shared(SHARED, dict(os.environ))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of builtin:tiny-random, built once per pytest session."""
    from polyalign.models import load_model, load_tokenizer

    return load_model("builtin:tiny-random"), load_tokenizer("builtin:tiny-random")


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    # Each test gets its own empty cache; real-model tests reuse the user's (the model is built once).
    if request.node.get_closest_marker("real_model") is None:
        monkeypatch.setenv("POLYALIGN_CACHE", str(tmp_path / "cache"))


class _Stub(BaseHTTPRequestHandler):
    """OpenAI-compatible stub on loopback: ``script`` says what each successive call returns,
    as (status, content) or (status, content, headers); content that starts with 'RAW:' is sent
    as the raw response body."""

    script: list = []
    seen_auth: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["messages"][0]["role"] == "system"
        _Stub.seen_auth.append(self.headers.get("Authorization"))
        _Stub.requests.append(body)
        status, content, *headers = _Stub.script.pop(0) if _Stub.script else (200, "safe")
        self.send_response(status)
        for name, value in (headers[0] if headers else {}).items():
            self.send_header(name, value)
        self.end_headers()
        if status == 200:
            payload = content[4:] if content.startswith("RAW:") else json.dumps(
                {"choices": [{"message": {"content": content}}]})
            self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    _Stub.script, _Stub.seen_auth, _Stub.requests = [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}/v1", handler=_Stub)
    server.shutdown()
