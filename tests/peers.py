"""The peer gateways (LiteLLM proxy, Portkey gateway) as subprocesses, for tests and bench/.

`scripts/install_peers.sh` puts them under `.peers/`; `LITELLM_BIN` (the `litellm` executable) and
`PORTKEY_DIR` (a directory holding `node_modules/@portkey-ai/gateway`, or the package itself) point
elsewhere. Each finder returns (path, None) or (None, why it is missing): tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".peers"
INSTALL = "run `bash scripts/install_peers.sh`"


def _failed(peer: str) -> str:
    """What install_peers.sh left when installing `peer` failed, as part of a skip reason."""
    f = PEERS / f"{peer}.failed"
    return f"; {f.read_text().strip()}" if f.exists() else ""


def litellm_bin() -> tuple[str | None, str | None]:
    env = os.environ.get("LITELLM_BIN")
    if env:
        return (env, None) if os.access(env, os.X_OK) else (None, f"LITELLM_BIN={env} is not an executable")
    exe = PEERS / "litellm" / "bin" / "litellm"
    if exe.exists():
        return str(exe), None
    return None, f"LiteLLM is not installed in {exe.parent.parent} ({INSTALL}, or set LITELLM_BIN){_failed('litellm')}"


def portkey_entry() -> tuple[list[str] | None, str | None]:
    """The command that starts the Portkey gateway (node + its build/start-server.js)."""
    node = shutil.which("node")
    if node is None:
        return None, "node is not on PATH (the Portkey gateway runs on Node.js)"
    base = Path(os.environ.get("PORTKEY_DIR") or PEERS / "portkey")
    for d in (base / "node_modules" / "@portkey-ai" / "gateway", base):
        script = d / "build" / "start-server.js"
        if script.exists():
            return [node, str(script)], None
    return (
        None,
        f"@portkey-ai/gateway is not installed under {base} ({INSTALL}, or set PORTKEY_DIR){_failed('portkey')}",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float, name: str, tail: Callable[[], str] = lambda: ""
) -> None:
    """Until `url` answers below 500; RuntimeError if `proc` exits first or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start: {tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s: {tail()}")


class Peer:
    """A peer gateway process, its base URL and its log file."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        url: str,
        ready: str,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name, self.url, self.ready, self.log = name, url, ready, log
        self._fh = open(log, "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait(self, timeout: float) -> None:
        """Until `ready` answers below 500; RuntimeError (with the log's tail) if it exits or times out."""
        wait_http(self.ready, self.proc, timeout, self.name, self.tail)

    def tail(self, n: int = 1500) -> str:
        self._fh.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()


def litellm_config(
    upstream: str, guardrail_base: str | None, *, key_env: str = "GUARDGATE_KEY", model: str = "gpt-test"
) -> str:
    """A LiteLLM config.yaml: one model on `upstream` (an OpenAI-compatible base URL) and, when
    `guardrail_base` is set, Guardgate as its generic guardrail before and after every call."""
    conf = f"""model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {upstream}
      api_key: sk-upstream-not-a-key
"""
    if guardrail_base:
        conf += f"""guardrails:
  - guardrail_name: guardgate
    litellm_params:
      guardrail: generic_guardrail_api
      mode: [pre_call, post_call]
      api_base: {guardrail_base}
      api_key: os.environ/{key_env}
      default_on: true
"""
    return conf


def start_litellm(exe: str, config: str, tmp: Path, env: dict[str, str] | None = None) -> Peer:
    d = tmp / "litellm"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(config)
    port = free_port()
    # Defaults, one worker; the two settings only let it start offline without a master key.
    base_env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        "LITELLM_TELEMETRY": "False",
        **(env or {}),
    }
    cmd = [exe, "--config", str(d / "config.yaml"), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return Peer(
        "litellm",
        cmd,
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{port}/health/liveliness",
        d / "litellm.log",
        env=base_env,
        cwd=d,
    )


def start_portkey(cmd: list[str], tmp: Path) -> Peer:
    port = free_port()
    return Peer(
        "portkey",
        [*cmd, f"--port={port}", "--headless"],
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{port}/",
        tmp / "portkey.log",
        env={"NODE_ENV": "production"},
    )


def portkey_config(upstream: str, webhook: str | None, key: str) -> dict[str, object]:
    """An `x-portkey-config`: the OpenAI provider on `upstream` (custom_host) and, when `webhook` is set,
    Guardgate as a webhook guardrail before and after the request (deny on a failed check, and on a
    webhook error: failOnError)."""
    conf: dict[str, object] = {"provider": "openai", "api_key": "sk-upstream-not-a-key", "custom_host": upstream}
    if webhook:
        check = {
            "id": "default.webhook",
            "parameters": {
                "webhookURL": webhook,
                "headers": {"Authorization": f"Bearer {key}"},
                "failOnError": True,
                "timeout": 5000,
            },
        }
        conf["before_request_hooks"] = [{"type": "guardrail", "id": "guardgate-input", "deny": True, "checks": [check]}]
        conf["after_request_hooks"] = [{"type": "guardrail", "id": "guardgate-output", "deny": True, "checks": [check]}]
    return conf
