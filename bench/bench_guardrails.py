"""Added latency of Guardgate as another gateway's guardrail (issue 32), one run, side by side.

    python bench/bench_guardrails.py [--requests 300] [--warmup 30] [--json]

Starts a fast scripted upstream (bench/fake_upstream.py), `guardgate serve` (uvloop) with a regex-only
policy (tests/guardrails_fixtures.py's `guard`: two input steps, two output steps), and each installed
peer twice: alone, and with Guardgate as its guardrail before and after the call (LiteLLM: generic
guardrail API, mode [pre_call, post_call]; Portkey: webhook in before_request_hooks and
after_request_hooks). One client sends benign non-stream chat requests, one at a time, round-robin
over the targets (so machine noise hits all alike), and prints p50 / p90 per target and the added
latency of the guardrail round trips (with − alone). A direct POST to Guardgate's check API gives the
cost of one check on its own. Peers that are not installed are skipped (scripts/install_peers.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from guardrails_fixtures import BENIGN, write_policy  # noqa: E402
from peers import (  # noqa: E402
    Peer,
    free_port,
    litellm_bin,
    litellm_config,
    portkey_config,
    portkey_entry,
    start_litellm,
    start_portkey,
    wait_http,
)

KEY = "gk-bench-key-0123456789"
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": BENIGN}]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Target:
    def __init__(self, name: str, url: str, headers: dict[str, str] | None = None, body: Any = None) -> None:
        self.name, self.url, self.headers, self.body = name, url, headers or {}, body or BODY
        self.ms: list[float] = []


async def one(s: aiohttp.ClientSession, t: Target) -> None:
    t0 = time.perf_counter()
    async with s.post(t.url, json=t.body, headers=t.headers) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{t.name}: HTTP {r.status}: {(await r.text())[:300]}")
    t.ms.append((time.perf_counter() - t0) * 1000)


async def measure(targets: list[Target], n: int, warmup: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(warmup):
            for t in targets:
                await one(s, t)
        for t in targets:
            t.ms.clear()
        for _ in range(n):
            for t in targets:
                await one(s, t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-guardrails-"))
    procs: list[subprocess.Popen[bytes]] = []
    peers: list[Peer] = []
    skipped: dict[str, str] = {}
    try:
        up_port, gg_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(up_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        upstream = f"http://127.0.0.1:{up_port}/v1"
        policy = write_policy(tmp)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "serve",
                    "--upstream",
                    upstream,
                    "--port",
                    str(gg_port),
                    "--policy",
                    policy,
                    "--log-level",
                    "WARNING",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        gg = f"http://127.0.0.1:{gg_port}"
        wait_http(gg + "/healthz", procs[-1], 60, "guardgate serve")
        targets = [Target("guardgate check API (one input check)", gg + "/guardrails/guard")]
        exe, why = litellm_bin()
        if exe is None:
            skipped["litellm"] = why or ""
        else:
            (tmp / "a").mkdir()
            (tmp / "b").mkdir()
            alone = start_litellm(exe, litellm_config(upstream, None, model="bench"), tmp / "a", {})
            guarded = start_litellm(
                exe,
                litellm_config(upstream, gg + "/guardrails/guard/litellm", model="bench"),
                tmp / "b",
                {"GUARDGATE_KEY": KEY},
            )
            peers += [alone, guarded]
            for p in (alone, guarded):
                p.wait(180)
            body = {**BODY, "model": "bench"}
            targets += [
                Target("litellm alone", alone.url + "/v1/chat/completions", body=body),
                Target("litellm + guardgate", guarded.url + "/v1/chat/completions", body=body),
            ]
        cmd, why = portkey_entry()
        if cmd is None:
            skipped["portkey"] = why or ""
        else:
            pk = start_portkey(cmd, tmp)
            peers.append(pk)
            pk.wait(60)
            for name, hook in (("portkey alone", None), ("portkey + guardgate", gg + "/guardrails/guard/portkey")):
                conf = json.dumps(portkey_config(upstream, hook, KEY))
                targets.append(Target(name, pk.url + "/v1/chat/completions", {"x-portkey-config": conf}))
        asyncio.run(measure(targets, args.requests, args.warmup))
    finally:
        for p in peers:
            p.stop()
        for pr in procs:
            pr.terminate()
            pr.wait(10)
    by = {t.name: t for t in targets}
    res: dict[str, Any] = {"requests": args.requests, "targets": {}, "added": {}, "skipped": skipped}
    for t in targets:
        res["targets"][t.name] = {"p50_ms": round(statistics.median(t.ms), 2), "p90_ms": round(pct(t.ms, 0.9), 2)}
    for peer in ("litellm", "portkey"):
        a, g = by.get(f"{peer} alone"), by.get(f"{peer} + guardgate")
        if a and g:
            res["added"][peer] = {
                "p50_ms": round(statistics.median(g.ms) - statistics.median(a.ms), 2),
                "p90_ms": round(pct(g.ms, 0.9) - pct(a.ms, 0.9), 2),
                "ratio_p50": round(statistics.median(g.ms) / statistics.median(a.ms), 2),
            }
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{args.requests} benign non-stream chat requests per target, one at a time, round-robin")
    for name, r in res["targets"].items():
        print(f"  {name:40s} p50 {r['p50_ms']:8.2f} ms   p90 {r['p90_ms']:8.2f} ms")
    for peer, r in res["added"].items():
        print(
            f"  added by guardgate under {peer:8s} p50 +{r['p50_ms']:.2f} ms   p90 +{r['p90_ms']:.2f} ms   "
            f"(x{r['ratio_p50']} of {peer} alone; two round trips: input and output)"
        )
    for peer, why in skipped.items():
        print(f"  {peer}: skipped: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
