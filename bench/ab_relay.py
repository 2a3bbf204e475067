"""A/B for the byte relay's latency: the gateway at a git ref against the working tree, same run.

    python bench/ab_relay.py [--ref HEAD] [--requests 1000] [--json-only] [--policy bench/regex-stream.yaml]

Why: on a 2-core machine the added latency of a relay moves by ±0.03 ms from one run to the next,
more than most single changes to the hot path are worth. Measured side by side, request by request
in a shuffled order (as scripts/bench.py does), two identical copies agree within ~0.005 ms, so a
change's effect can be told from noise. Targets, each its own process, on loopback:
  direct  bench/fake_upstream.py (the baseline)
  nginx   Debian's nginx, scripts/bench.py's config (skipped when not installed)
  ref     guardgate serve, the code of `--ref` (exported with `git archive`)
  tree    guardgate serve, the code in the working tree
Prints each target's added p50 (median of the per-round differences to direct) for a non-stream
JSON request, and unless --json-only the time to first byte and the whole of a 20-chunk stream,
and tree's figures as ratios to ref's and nginx's.

    --cpu N   also N rounds (shuffled) of `wrk -c1` for 2 s per target: CPU time per request of the
              target's processes (/proc/PID/schedstat: on-CPU ns, not ticks) and wrk's mean latency.
              On 2 cores a sequential client, the relay and the upstream often all run on one core
              (sync wakeups pull them together), so all of a relay's CPU per request is added latency.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench as B  # scripts/bench.py: targets, process helpers, the one-request client


def export(ref: str, into: Path) -> None:
    """The gateway package as it is at `ref`."""
    tar = subprocess.run(["git", "archive", ref, "gateway"], cwd=B.ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")


def gateway(name: str, up: str, code: Path, policy: str | None = None) -> B.Target:
    port = B.free_port()
    # `--policy none` where the code has a default policy (the `starter`, since issue 19): the plain relay
    plain = ["--policy", "none"] if (Path(code) / "gateway" / "starter.py").exists() else []
    p = B.spawn([B.PY, "-m", "gateway.cli", "serve", "--upstream", up, "--port", str(port), "--log-level",
                 "WARNING", *(["--policy", policy] if policy else plain)], cwd=code, env={"PYTHONPATH": str(code)})
    return B.Target(name, f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/healthz", [p])


async def measure(targets: list[B.Target], n: int, json_only: bool) -> None:
    if not json_only:
        await B.latency(targets, n, warmup=50)
        return
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for t in targets:
            for _ in range(50):
                await B.one(s, t.base, False)
        rng = random.Random(9)
        order = list(targets)
        for _ in range(n):
            rng.shuffle(order)  # no target always goes first, as in scripts/bench.py
            for t in order:
                t.lat["json"].append((await B.one(s, t.base, False))[1])


def on_cpu_ns(pids: list[int]) -> int:
    """On-CPU time so far of these processes and their children (nginx's worker), in ns."""
    total = 0
    for pid in pids:
        kids = Path(f"/proc/{pid}/task/{pid}/children")
        more = [int(k) for k in kids.read_text().split()] if kids.exists() else []
        for q in [pid, *more]:
            for task in Path(f"/proc/{q}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
    return total


def cpu_rounds(targets: list[B.Target], rounds: int, tmp: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Per target: CPU us per request, and wrk's mean latency in us, one value per round."""
    script = tmp / "cpu.lua"
    script.write_text(B.WRK_LUA.format(body='\'{"model":"bench","messages":[{"role":"user","content":"hi"}]}\''))
    out: dict[str, tuple[list[float], list[float]]] = {t.name: ([], []) for t in targets}
    rng = random.Random(7)
    order = list(targets)
    for _ in range(rounds):
        rng.shuffle(order)
        for t in order:
            pids = [p.pid for p in t.procs]
            before = on_cpu_ns(pids)
            res = subprocess.run(["wrk", "-t1", "-c1", "-d2s", "--latency", "-s", str(script),
                                  t.base + "/chat/completions"], capture_output=True, text=True).stdout
            used = on_cpu_ns(pids) - before
            n = int(re.search(r"(\d+) requests in", res).group(1))  # type: ignore[union-attr]
            lat = re.search(r"Latency\s+([\d.]+)(us|ms)", res)
            assert lat is not None, res
            out[t.name][0].append(used / n / 1000)
            out[t.name][1].append(float(lat.group(1)) * (1000 if lat.group(2) == "ms" else 1))
    return out


async def main_async(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gg-ab-") as tmpd:
        tmp = Path(tmpd)
        export(a.ref, tmp / "ref")
        up_port = B.free_port()
        direct = B.Target("direct", f"http://127.0.0.1:{up_port}/v1", f"http://127.0.0.1:{up_port}/v1/models",
                          [B.spawn([B.PY, "bench/fake_upstream.py", "--port", str(up_port)])])
        pol = str(Path(a.policy).resolve()) if a.policy else None
        targets = [B.nginx_target(up_port, tmp), gateway("ref", direct.base, tmp / "ref", pol),
                   gateway("tree", direct.base, B.ROOT, pol)]
        if pol:  # the guarded path: the plain relay of the working tree too, for the ratio to it
            targets.insert(1, gateway("relay", direct.base, B.ROOT))
        try:
            for t in [direct, *targets]:
                if not t.skipped:
                    await B.wait_ready(t, 30)
            for t in targets:
                if t.skipped:
                    print(f"skipped {t.name}: {t.skipped}")
            live = [t for t in targets if not t.skipped]
            if direct.skipped or not any(t.name == "tree" for t in live):
                raise SystemExit(f"could not start: {direct.skipped or 'tree'}")
            await measure([direct, *live], a.requests, a.json_only)
            cpu = cpu_rounds([direct, *live], a.cpu, tmp) if a.cpu and shutil.which("wrk") else {}
        finally:
            B.stop([direct, *targets])
    kinds = ("json",) if a.json_only else B.KINDS
    added = {t.name: {k: B.pct([x - y for x, y in zip(t.lat[k], direct.lat[k], strict=True)], 0.5) for k in kinds}
             for t in live}
    print(f"\n{a.requests} rounds, CPUs {os.cpu_count()}; added p50 over direct, ms (ref = {a.ref})")
    for name, ad in added.items():
        print(f"  {name:<6}" + "".join(f"  {k} {v:+.3f}" for k, v in ad.items()))
    for other in ("ref", "relay", "nginx"):
        if other in added:
            print(f"  tree/{other:<5}" + "".join(f"  {k} x{B.ratio(added['tree'][k], added[other][k]):.2f}"
                                               for k in kinds))
    if cpu:
        med = {name: (statistics.median(c), statistics.median(w)) for name, (c, w) in cpu.items()}
        print(f"\nwrk -c1, {a.cpu} rounds of 2 s, medians: CPU us per request of the target's processes, "
              "wrk mean latency us (added over direct)")
        for name, (c, w) in med.items():
            print(f"  {name:<6}  cpu {c:6.1f}  latency {w:6.1f} ({w - med['direct'][1]:+.1f})")
        for other in ("ref", "nginx"):
            if other in med:
                print(f"  tree/{other:<5}  cpu x{B.ratio(med['tree'][0], med[other][0]):.2f}  added latency "
                      f"x{B.ratio(med['tree'][1] - med['direct'][1], med[other][1] - med['direct'][1]):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="HEAD", help="git ref to compare the working tree against")
    ap.add_argument("--requests", type=int, default=1000, help="rounds over all targets")
    ap.add_argument("--json-only", action="store_true", help="non-stream requests only (faster)")
    ap.add_argument("--cpu", type=int, default=0, metavar="N", help="N rounds of wrk -c1: CPU per request")
    ap.add_argument("--policy", metavar="FILE", help="ref and tree serve under this policy (the guarded path, "
                    "e.g. bench/regex-stream.yaml), beside the tree's plain relay")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
