"""A/B for the byte relay's latency: the gateway at a git ref against the working tree, same run.

    python bench/ab_relay.py [--ref HEAD] [--requests 1000] [--json-only]

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
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
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


def gateway(name: str, up: str, code: Path) -> B.Target:
    port = B.free_port()
    p = B.spawn([B.PY, "-m", "gateway.cli", "serve", "--upstream", up, "--port", str(port), "--log-level",
                 "WARNING"], cwd=code, env={"PYTHONPATH": str(code)})
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


async def main_async(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gg-ab-") as tmpd:
        tmp = Path(tmpd)
        export(a.ref, tmp / "ref")
        up_port = B.free_port()
        direct = B.Target("direct", f"http://127.0.0.1:{up_port}/v1", f"http://127.0.0.1:{up_port}/v1/models",
                          [B.spawn([B.PY, "bench/fake_upstream.py", "--port", str(up_port)])])
        targets = [B.nginx_target(up_port, tmp), gateway("ref", direct.base, tmp / "ref"),
                   gateway("tree", direct.base, B.ROOT)]
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
        finally:
            B.stop([direct, *targets])
    kinds = ("json",) if a.json_only else B.KINDS
    added = {t.name: {k: B.pct([x - y for x, y in zip(t.lat[k], direct.lat[k], strict=True)], 0.5) for k in kinds}
             for t in live}
    print(f"\n{a.requests} rounds, CPUs {os.cpu_count()}; added p50 over direct, ms (ref = {a.ref})")
    for name, ad in added.items():
        print(f"  {name:<6}" + "".join(f"  {k} {v:+.3f}" for k, v in ad.items()))
    for other in ("ref", "nginx"):
        if other in added:
            print(f"  tree/{other:<5}" + "".join(f"  {k} x{B.ratio(added['tree'][k], added[other][k]):.2f}"
                                               for k in kinds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="HEAD", help="git ref to compare the working tree against")
    ap.add_argument("--requests", type=int, default=1000, help="rounds over all targets")
    ap.add_argument("--json-only", action="store_true", help="non-stream requests only (faster)")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
