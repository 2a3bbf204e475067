"""CodeShield: our driver (gateway.guards.code_shield) vs the `codeshield` package's own
`CodeShield.scan_code`, on the same corpus, side by side in one run.

    .venv/bin/python bench/bench_code_shield.py [--repeat 1] [--limit N] [--json out.json]

Corpus: every snippet of the package's own tests (insecure_code_detector/tests/test_*.py, all
languages, parsed with `ast`, never imported) plus its semgrep fixture files, each scanned in its
own language, one snippet per call (no batching: the per-block latency a gateway pays).

Reported, for each driver: p50 / p90 / p99 / mean latency, how many snippets started semgrep, and
findings. Findings are compared per snippet as sets of rule ids against:
  - Meta as shipped: with current semgrep its `--project-root /` makes the semgrep tier scan
    nothing, so only its regex findings are real;
  - Meta fixed: the same driver with `--project-root /` dropped from the semgrep command (what its
    design finds with a working semgrep tier). This is the parity target.
Also: temp files Meta's driver leaves behind (ours: none), one-process batching on multi-block
answers, and what the stream check costs per call on prose with no code.

Through the server (``--no-server`` skips it): the same snippets, one fenced block per answer, streamed
by a local upstream through `guardgate serve` (a subprocess, on its own event loop: uvloop) with the
`openai` SDK; per block the step's guard time from the audit and the client's end-to-end time, and
the audit's findings against Meta's on the same snippets. The bench itself runs the serve loop too.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.cli import serve_loop_policy
from gateway.guards.code_shield import CodeShieldGuard, find_rules_dir

EXT_LANG = {".c": "c", ".js": "javascript", ".php": "php", ".py": "python", ".java": "java", ".cs": "csharp"}


def corpus(rules_dir: Path) -> list[tuple[str, str, str]]:
    """[(language, snippet, source)] from the package's tests and semgrep fixtures, deduplicated."""
    tests = rules_dir.parent / "tests"
    out: dict[tuple[str, str], str] = {}
    for path in sorted(tests.glob("test_*.py")):
        stem = path.stem[len("test_") :]
        for suffix in ("_insecure_code_detector", "_code_detector"):
            stem = stem.removesuffix(suffix)
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not (isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.List)):
                continue
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            name = getattr(target, "id", "")
            lang = stem
            if stem == "functional":
                lang = "csharp" if name.startswith("CSHARP") else "c"
            for elt in node.value.elts:
                if isinstance(elt, ast.Tuple) and elt.elts and isinstance(elt.elts[0], ast.Constant):
                    snippet = elt.elts[0].value
                    if isinstance(snippet, str) and snippet.strip():
                        out.setdefault((lang, snippet), f"tests/{path.name}")
    for path in sorted((rules_dir / "semgrep").rglob("*")):
        lang = EXT_LANG.get(path.suffix)
        if lang and path.is_file() and "_generated_" not in path.parts and path.name != "__init__.py":
            out.setdefault((lang, path.read_text()), f"fixture {path.relative_to(rules_dir)}")
    return [(lang, snippet, src) for (lang, snippet), src in out.items()]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "p50": pct(xs, 50),
        "p90": pct(xs, 90),
        "p99": pct(xs, 99),
        "mean": statistics.fmean(xs),
        "max": max(xs),
    }


def meta_rule_id(issue: Any) -> str:
    return str(issue.pattern_id or issue.name or issue.rule).rsplit(".", 1)[-1]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="passes over the corpus (latency samples)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N snippets (smoke runs)")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--no-server", action="store_true", help="skip the run through `guardgate serve`")
    args = ap.parse_args()

    rules_dir = find_rules_dir()
    if rules_dir is None:
        sys.exit("the codeshield package is not installed")
    items = corpus(rules_dir)
    random.Random(0).shuffle(items)
    if args.limit:
        items = items[: args.limit]

    # Meta's driver writes temp files it does not always delete: give it a private temp dir.
    meta_tmp = Path(tempfile.mkdtemp(prefix="bench-cs-meta-"))
    ours_tmp = Path(tempfile.mkdtemp(prefix="bench-cs-ours-"))

    t0 = time.perf_counter()
    from codeshield.cs import CodeShield
    from codeshield.insecure_code_detector import insecure_code_detector as icd
    from codeshield.insecure_code_detector.languages import Language

    meta_import_ms = (time.perf_counter() - t0) * 1000
    shipped_run = icd._run_command

    async def fixed_run(command: list[str]) -> str:  # Meta's command minus `--project-root /`
        if "--project-root" in command:
            i = command.index("--project-root")
            command = command[:i] + command[i + 2 :]
        return await shipped_run(command)

    meta_semgrep_runs = 0

    async def counting_run(command: list[str]) -> str:
        nonlocal meta_semgrep_runs
        meta_semgrep_runs += 1
        return await shipped_run(command)

    guard = CodeShieldGuard()  # tier 2 on a long-lived osemgrep lsp (the default)
    guard_proc = CodeShieldGuard(semgrep_mode="process")  # tier 2 as one osemgrep process per batch
    tempfile.tempdir = str(ours_tmp)
    t0 = time.perf_counter()
    await guard.start()
    ours_start_ms = (time.perf_counter() - t0) * 1000
    await guard_proc.start()
    scanner = await guard.scanner()
    assert scanner.semgrep is not None, "semgrep is not installed: the comparison needs it"
    t0 = time.perf_counter()
    await guard.scan_code("eval(x)", "python")  # first scan on the server start() launched
    server_start_ms = (time.perf_counter() - t0) * 1000
    tempfile.tempdir = None

    async def ours(lang: str, code: str, g: CodeShieldGuard = guard) -> tuple[float, set[str], bool]:
        sg = (await g.scanner()).semgrep
        assert sg is not None
        before = sg.runs
        tempfile.tempdir = str(ours_tmp)
        t = time.perf_counter()
        r = await g.scan_code(code, lang)
        dt = (time.perf_counter() - t) * 1000
        tempfile.tempdir = None
        return dt, {f.rule for f in r.findings}, sg.runs > before

    async def meta(lang: str, code: str, fixed: bool) -> tuple[float, set[str], bool]:
        nonlocal meta_semgrep_runs
        icd._run_command = fixed_run if fixed else counting_run  # type: ignore[assignment]
        before = meta_semgrep_runs
        tempfile.tempdir = str(meta_tmp)
        t = time.perf_counter()
        r = await CodeShield.scan_code(code, Language(lang))
        dt = (time.perf_counter() - t) * 1000
        tempfile.tempdir = None
        icd._run_command = shipped_run  # type: ignore[assignment]
        return dt, {meta_rule_id(i) for i in (r.issues_found or [])}, meta_semgrep_runs > before

    # warm up both (imports, rule loading, page cache of the semgrep binary)
    for lang, code, _ in items[:3]:
        await ours(lang, code)
        await meta(lang, code, fixed=False)

    lat: dict[str, list[float]] = {"ours": [], "ours_process": [], "meta": [], "meta_fixed": []}
    semgrep_started = {"ours": 0, "meta": 0}
    rows = []
    for rep in range(args.repeat):
        for i, (lang, code, src) in enumerate(items):
            order = ["ours", "meta"] if (i + rep) % 2 == 0 else ["meta", "ours"]
            res: dict[str, tuple[float, set[str], bool]] = {}
            for who in order:
                res[who] = await (ours(lang, code) if who == "ours" else meta(lang, code, fixed=False))
            res["meta_fixed"] = await meta(lang, code, fixed=True)
            res["ours_process"] = await ours(lang, code, guard_proc)
            assert res["ours_process"][1] == res["ours"][1], (lang, src)  # both engines find the same
            for who in lat:
                lat[who].append(res[who][0])
            if rep == 0:
                semgrep_started["ours"] += res["ours"][2]
                semgrep_started["meta"] += res["meta"][2]
                rows.append((lang, src, res["ours"][1], res["meta"][1], res["meta_fixed"][1]))

    served = None if args.no_server else await through_server(items, rows)

    leaked = sum(1 for _ in meta_tmp.rglob("*"))
    await guard.aclose()
    ours_leaked = sum(1 for _ in ours_tmp.rglob("*"))  # the server's workspace goes with aclose()
    shutil.rmtree(meta_tmp, ignore_errors=True)
    shutil.rmtree(ours_tmp, ignore_errors=True)

    def compare(idx: int) -> dict[str, Any]:
        same = more = missing = 0
        missed: list[tuple[str, str, list[str]]] = []
        extra: dict[str, int] = {}
        for row in rows:
            o, m = row[2], row[idx]
            if o == m:
                same += 1
            elif m <= o:
                more += 1
                for r in o - m:
                    extra[r] = extra.get(r, 0) + 1
            else:
                missing += 1
                missed.append((row[0], row[1], sorted(m - o)))
        return {
            "same": same,
            "ours_more": more,
            "ours_missing": missing,
            "missed": missed[:10],
            "extra": extra,
        }

    vs_shipped, vs_fixed = compare(3), compare(4)
    snippets = len(items)
    flagged = {k: sum(1 for r in rows if r[i]) for k, i in (("ours", 2), ("meta", 3), ("meta_fixed", 4))}
    findings = {k: sum(len(r[i]) for r in rows) for k, i in (("ours", 2), ("meta", 3), ("meta_fixed", 4))}

    # batching: answers of 4 blocks that need semgrep, one process for ours vs 4 concurrent scan_code
    sem_items = [(lang, code) for lang, code, _ in items if lang in ("python", "javascript", "c", "java")]
    sem_items = [x for x in sem_items if any(scanner.tier2_rules(x[1], x[0]))][:24]
    batch_ours, batch_meta = [], []
    for k in range(0, len(sem_items) - 3, 4):
        group = sem_items[k : k + 4]
        text = "\n\n".join(f"```{lang}\n{code.rstrip()}\n```" for lang, code in group) + "\n"
        t = time.perf_counter()
        await guard_proc.scan_text(text)  # one osemgrep process for the 4 blocks
        batch_ours.append((time.perf_counter() - t) * 1000)
        tempfile.tempdir = str(Path(tempfile.mkdtemp(prefix="bench-cs-meta-")))
        t = time.perf_counter()
        await asyncio.gather(*(CodeShield.scan_code(code, Language(lang)) for lang, code in group))
        batch_meta.append((time.perf_counter() - t) * 1000)
        shutil.rmtree(tempfile.tempdir, ignore_errors=True)
        tempfile.tempdir = None

    # the stream check on prose with no code: cost per check
    prose = " ".join(
        f"Sentence {i} explains a harmless step, with `inline` code and a list:\n- item" for i in range(3000)
    )
    s = guard.open_stream([], "bench")
    per_check = []
    step = 128  # ~32 tokens per check
    for end in range(step, len(prose), step):
        t = time.perf_counter()
        await s.check(prose[:end], end - step, False)
        per_check.append((time.perf_counter() - t) * 1e6)
    await s.close()

    def line(name: str, xs: list[float]) -> str:
        st = summary(xs)
        return (
            f"  {name:<22} p50 {st['p50']:8.2f}  p90 {st['p90']:8.2f}  p99 {st['p99']:8.2f}  "
            f"mean {st['mean']:8.2f}  max {st['max']:8.2f}"
        )

    sm, sf = summary(lat["meta"]), summary(lat["meta_fixed"])

    def ratios(who: str, base: dict[str, float]) -> str:
        st = summary(lat[who])
        return "  ".join(f"{k} {st[k] / base[k]:.3f}" for k in ("p50", "p90", "p99", "mean"))

    langs = ", ".join(sorted({lang for lang, _, _ in items}))
    print(f"corpus: {snippets} snippets ({langs}), repeat {args.repeat}")
    print(
        f"semgrep {scanner.semgrep.version()}; start-up: ours start() {ours_start_ms:.0f} ms (rules, cached "
        f"prefilters, semgrep server; first scan {server_start_ms:.0f} ms), import codeshield.cs "
        f"{meta_import_ms:.0f} ms"
    )
    print("scan latency per snippet (ms):")
    print(line("ours (semgrep server)", lat["ours"]))
    print(line("ours (process/batch)", lat["ours_process"]))
    print(line("meta (shipped)", lat["meta"]))
    print(line("meta (fixed semgrep)", lat["meta_fixed"]))
    print(f"ratio ours/meta(shipped):          {ratios('ours', sm)}")
    print(f"ratio ours/meta(fixed):            {ratios('ours', sf)}")
    print(f"ratio ours(process)/meta(shipped): {ratios('ours_process', sm)}")
    print(f"tier-2 semgrep runs: ours {semgrep_started['ours']} / meta {semgrep_started['meta']} (of {snippets})")
    print(f"snippets flagged: ours {flagged['ours']}, meta {flagged['meta']}, meta fixed {flagged['meta_fixed']}")
    print(f"findings (rule ids): ours {findings['ours']}, meta {findings['meta']}, meta fixed {findings['meta_fixed']}")
    for name, c in (("vs meta (shipped)", vs_shipped), ("vs meta (fixed)", vs_fixed)):
        print(f"  {name}: same {c['same']}, ours more {c['ours_more']}, ours missing {c['ours_missing']}")
        for m in c["missed"]:
            print(f"     missing: {m}")
    print(f"  rules only we report (vs fixed): {dict(sorted(vs_fixed['extra'].items(), key=lambda kv: -kv[1]))}")
    print(f"temp files left behind: meta {leaked}, ours {ours_leaked}")
    if batch_ours:
        print(
            f"answers of 4 blocks needing semgrep ({len(batch_ours)}): ours one process p50 "
            f"{pct(batch_ours, 50):.0f} ms vs meta 4x scan_code gathered p50 {pct(batch_meta, 50):.0f} ms"
        )
    pc = summary(per_check)
    print(
        f"stream check on prose, no code ({len(per_check)} checks of {step} chars): "
        f"p50 {pc['p50']:.1f} us, p99 {pc['p99']:.1f} us, mean {pc['mean']:.1f} us"
    )
    if served is not None:
        print(f"through guardgate serve ({served['loop']}, {served['blocks']} blocks, one per streamed answer):")
        print(line("guard time (audit)", served["guard_ms"]))
        print(line("client end-to-end", served["e2e_ms"]))
        cs = served["vs_meta"]
        print(f"  findings vs meta (fixed) on the same snippets: same {cs['same']}, ours more {cs['ours_more']}, "
              f"ours missing {cs['ours_missing']}; step errors {served['errors']}; tier 2 {served['tier2']}")
        for m in cs["missed"]:
            print(f"     missing: {m}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "snippets": snippets,
                    "latency_ms": {k: summary(v) for k, v in lat.items()},
                    "semgrep_started": semgrep_started,
                    "flagged": flagged,
                    "findings": findings,
                    "vs_shipped": vs_shipped,
                    "vs_fixed": vs_fixed,
                    "meta_temp_files_left": leaked,
                    "batch_ms": {"ours": batch_ours, "meta": batch_meta},
                    "prose_check_us": pc,
                    "server": served and {k: (summary(v) if k.endswith("_ms") else v) for k, v in served.items()},
                },
                indent=1,
                default=list,
            )
        )


async def through_server(items: list[tuple[str, str, str]], rows: list[Any]) -> dict[str, Any]:
    """Each snippet as the only fenced block of a streamed answer, through `guardgate serve`."""
    import httpx
    import openai
    from aiohttp import web

    async def upstream(request: web.Request) -> web.StreamResponse:  # answers with the user's text
        body = await request.json()
        text = body["messages"][-1]["content"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(text), 24):
            delta = {"choices": [{"index": 0, "delta": {"content": text[i : i + 24]}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(delta)}\n\n".encode())
        await resp.write(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    work = Path(tempfile.mkdtemp(prefix="bench-cs-serve-"))
    policy, audit, log = work / "cs.yaml", work / "audit.jsonl", work / "serve.log"
    policy.write_text(textwrap.dedent("""\
        name: cs
        stream:
          steps:
            - guard: code_shield
              action: warn
              timeout_ms: 20000
        """))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--upstream", f"http://127.0.0.1:{up_port}/v1",
             "--port", str(port), "--policy", str(policy), "--audit", str(audit), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=work,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"guard_ms": [], "e2e_ms": [], "errors": 0, "tier2": {}}
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(600):
                try:
                    ready = (await http.get(url + "/readyz")).json()
                    break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"guardgate serve did not start: {log.read_text()}")
        status = ready["policies"]["cs"]["stream[0]:code_shield"]
        assert status["state"] == "ready", status
        out["loop"] = log.read_text().rsplit("event loop: ", 1)[-1].split(")")[0].strip()
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        found: list[set[str]] = []
        for lang, code, _ in items:
            answer = f"Here it is:\n\n```{lang}\n{code.rstrip()}\n```\n\nDone.\n"
            n_before = len(audit.read_text().splitlines()) if audit.exists() else 0
            t = time.perf_counter()
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": answer}], stream=True
            )
            async for _chunk in stream:
                pass
            out["e2e_ms"].append((time.perf_counter() - t) * 1000)
            for _ in range(1000):
                lines = audit.read_text().splitlines() if audit.exists() else []
                if len(lines) > n_before:
                    break
                await asyncio.sleep(0.005)
            step = json.loads(lines[-1])["steps"][0]
            out["guard_ms"].append(step["latency_ms"])
            out["errors"] += bool(step.get("error"))
            for b in step.get("blocks", []):
                out["tier2"][b["tier2"]] = out["tier2"].get(b["tier2"], 0) + 1
            found.append({f["rule"] for b in step.get("blocks", []) for f in b["findings"]})
        await client.close()
    finally:
        proc.terminate()
        proc.wait(20)
        await runner.cleanup()
    same = more = missing = 0
    missed = []
    for row, ours in zip(rows, found, strict=True):
        meta = row[4]  # Meta fixed (a working semgrep tier)
        if ours == meta:
            same += 1
        elif meta <= ours:
            more += 1
        else:
            missing += 1
            missed.append((row[0], row[1], sorted(meta - ours)))
    out["blocks"] = len(found)
    out["vs_meta"] = {"same": same, "ours_more": more, "ours_missing": missing, "missed": missed[:10]}
    return out


if __name__ == "__main__":
    asyncio.set_event_loop_policy(serve_loop_policy())  # the loop `guardgate serve` runs
    asyncio.run(main())
