"""PolicyStore: selection by name or path; hot reload (explicit, polling, SIGHUP); bad files rejected."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from waits import until

from gateway.policy.reload import PolicyStore
from gateway.policy.schema import PolicyError


def pol(name: str, pattern: str = "bad") -> str:
    return f"name: {name}\nstream:\n  steps:\n    - guard: regex\n      patterns: [{pattern}]\n"


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "one.yaml").write_text(pol("one"))
    (d / "two.yml").write_text(pol("two"))
    (d / "notes.txt").write_text("not a policy")
    return d


def pattern_of(store: PolicyStore, name: str) -> str:
    return store.get(name).stream.steps[0].guard.patterns[0].source


def test_loads_directory_and_selects_by_name_or_path(pdir: Path, tmp_path: Path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(pol("special"))
    store = PolicyStore(dirs=[pdir], required=["one", str(extra)])
    assert store.names() == ["one", "special", "two"]
    assert store.get(str(extra)).name == "special" and "two" in store and "nope" not in store
    with pytest.raises(KeyError, match="no policy named 'nope'"):
        store.get("nope")


def test_missing_required_policy_is_an_error(pdir: Path):
    with pytest.raises(PolicyError, match="policy 'three' not found"):
        PolicyStore(dirs=[pdir], required=["three"])


def test_bad_required_file_fails_at_start_with_file_line(pdir: Path):
    (pdir / "three.yaml").write_text("name: three\nmode: loud\n")
    with pytest.raises(PolicyError, match=r"three.yaml:2: .*mode must be one of"):
        PolicyStore(dirs=[pdir], required=["three"])
    store = PolicyStore(dirs=[pdir], required=["one"])  # an unused bad file is only logged
    assert "three" not in store and any("three.yaml:2" in e for e in store.errors.values())


def test_duplicate_names_are_rejected(pdir: Path):
    (pdir / "zzz.yaml").write_text(pol("one"))
    store = PolicyStore(dirs=[pdir])
    assert store.get("one").file and store.get("one").file.endswith("one.yaml")
    assert any("duplicate policy name 'one'" in e for e in store.errors.values())


async def test_reload_swaps_good_and_keeps_running_policy_on_bad(pdir: Path,
                                                                  caplog: pytest.LogCaptureFixture):
    store = PolicyStore(dirs=[pdir], required=["one"])
    await store.start(watch=False, sighup=False)
    try:
        old = store.get("one")
        (pdir / "one.yaml").write_text(pol("one", "worse"))
        assert await store.reload() == []
        assert store.get("one") is not old and pattern_of(store, "one") == "worse"
        assert old.retired and store.get("one").started

        good = store.get("one")
        bad = "name: one\nstream:\n  steps:\n    - guard: regex\n      patterns: ['((']\n"
        (pdir / "one.yaml").write_text(bad)
        errors = await store.reload()
        assert len(errors) == 1 and "one.yaml:5" in errors[0] and "not a valid regex" in errors[0]
        assert store.get("one") is good  # the running policy stays
        assert "keeping the running policy one" in caplog.text

        (pdir / "four.yaml").write_text(pol("four"))
        await store.reload()
        assert "four" in store
        (pdir / "four.yaml").unlink()
        await store.reload()
        assert "four" in store  # a removed file keeps its policy until restart
    finally:
        await store.aclose()


async def test_file_change_is_picked_up_by_polling(pdir: Path):
    store = PolicyStore(dirs=[pdir], poll_interval=0.02)
    await store.start(sighup=False)
    try:
        (pdir / "two.yml").write_text(pol("two", "changed"))
        assert await until(lambda: pattern_of(store, "two") == "changed", timeout=5)
    finally:
        await store.aclose()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads(pdir: Path):
    store = PolicyStore(dirs=[pdir])
    await store.start(watch=False)
    try:
        assert store._sighup
        (pdir / "one.yaml").write_text(pol("one", "hup"))
        os.kill(os.getpid(), signal.SIGHUP)
        assert await until(lambda: pattern_of(store, "one") == "hup", timeout=5)
    finally:
        await store.aclose()
