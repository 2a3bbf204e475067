"""The running gateway's upstreams by name, for guards that ask a model (alignment_check's judge).

Guards are built when a policy loads, before (and independently of) the server's upstreams; the
server binds its upstreams here once they are started, and a guard looks one up per check, so a
judge named `upstream: main` uses that upstream's pool, key and timeouts. Nothing here imports the
server: it hands the mapping in (as it hands `on_verdict` its listener).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_upstreams: Mapping[str, Any] = {}


def bind(upstreams: Mapping[str, Any]) -> None:
    """Make the running gateway's upstreams (name -> HttpUpstream | NeutralUpstream) reachable by name."""
    global _upstreams
    _upstreams = upstreams


def get(name: str) -> Any:
    """The upstream called `name`; LookupError when the running gateway has none by that name."""
    try:
        return _upstreams[name]
    except KeyError:
        known = ", ".join(sorted(_upstreams)) or "none (no gateway running)"
        raise LookupError(f"no upstream named {name!r} (known: {known})") from None
