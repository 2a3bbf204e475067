"""Gateway configuration: listeners, upstreams, routes, gateway keys, limits.

Loaded from `conf/gateway.yaml` (or built from `guardgate serve` quick flags). Secrets come only
from the environment: the file names env vars (`api_key_env`, `key_env`), never keys.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gateway.yamlio import ConfigError, Fields, load

log = logging.getLogger("guardgate.config")

DIALECTS = ("openai", "llama")


@dataclass(slots=True)
class Timeouts:
    connect: float = 10.0  # TCP/TLS connect
    read: float = 300.0  # idle time between bytes (first byte included); streams may run longer
    total: float | None = None  # whole exchange, off by default (long streams)


@dataclass(slots=True)
class UpstreamConfig:
    name: str
    type: str = "http"  # http | llama_cpp
    base_url: str = ""
    dialect: str = "openai"
    api_key_env: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 1000
    model: str | None = None  # llama_cpp: manifest name or GGUF path
    options: dict = field(default_factory=dict)  # llama_cpp engine options (n_ctx, threads, n_gpu_layers)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


RATE_KEYS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent_streams")


@dataclass(frozen=True, slots=True)
class Rates:
    """Rate limits as written on a key or a route (None: not set there; 0: explicitly unlimited)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent_streams: int | None = None

    @property
    def any(self) -> bool:
        return any(getattr(self, k) for k in RATE_KEYS)


@dataclass(slots=True)
class Route:
    upstream: str
    path: str | None = None  # client path prefix, e.g. "/llama/"
    model: str | None = None  # model name glob, e.g. "gpt-*"
    policy: str | None = None
    # Endpoint names (gateway.endpoints) relayed unguarded even under an inspecting policy.
    passthrough: frozenset[str] = frozenset()
    rates: Rates = field(default_factory=Rates)  # defaults for every key (or keyless client) on this route

    def matches(self, path: str, model: str | None) -> bool:
        if self.path is not None and not path.startswith(self.path):
            return False
        if self.model is None:
            return True
        return model is not None and fnmatch.fnmatchcase(model_key(model), model_key(self.model))


def model_key(model: str) -> str:
    """How model names (and Azure deployment names) compare: case- and surrounding-whitespace-blind.
    Many upstreams accept `GPT-4o ` for `gpt-4o`, so a route chosen by model must too: a variant
    spelling never falls through to a less guarded route."""
    return model.strip().casefold()


@dataclass(slots=True)
class GatewayKey:
    name: str
    key_env: str
    policy: str | None = None
    rates: Rates = field(default_factory=Rates)  # this key's limits, across every route

    def value(self) -> str | None:
        return os.environ.get(self.key_env)


@dataclass(slots=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    send_timeout_s: float = 60.0  # a client that takes no bytes for this long is cut (relay.TimedResponse)
    head_timeout_s: float = 60.0  # a request head (or an idle keep-alive connection) may take this long
    body_timeout_s: float = 60.0  # a request body may take this long to arrive
    # Where rate-limit counters live (gateway.limits): one process, or Redis shared by replicas.
    store: str = "memory"  # memory | redis
    url: str | None = None  # redis://host:6379/0 (store: redis)
    on_store_error: str = "allow"  # allow | deny: what a request gets when the store cannot answer
    store_timeout_ms: int = 250  # a store slower than this counts as failed


@dataclass(slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)
    keys: list[GatewayKey] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    policy: str | None = None  # applies to everything (overrides routes and keys): `--policy`
    policy_dirs: list[str] = field(default_factory=lambda: ["policies"])
    responses_state: str = "upstream"  # "gateway": keep guarded Responses conversations (responses_state.py)
    audit_path: str | None = None
    audit_content: bool = False
    audit_max_bytes: int = 0  # rotate the audit log past this size (0 = never)
    audit_backups: int = 5
    shutdown_grace_s: float = 30.0
    source: str | None = None

    def route_for(self, path: str, model: str | None) -> Route | None:
        for r in self.routes:
            if r.matches(path, model):
                return r
        return None

    def needs_model_for_routing(self) -> bool:
        return any(r.model is not None for r in self.routes)


def _timeouts(obj: object, file: str | None) -> Timeouts:
    f = Fields(obj, file, "timeouts", {"connect", "read", "total"})
    return Timeouts(
        connect=f.get("connect", float, 10.0),
        read=f.get("read", float, 300.0),
        total=f.get("total", float, None),
    )


def _upstream(name: str, obj: object, file: str | None) -> UpstreamConfig:
    f = Fields(obj, file, f"upstreams.{name}",
               {"type", "base_url", "dialect", "api_key_env", "timeouts", "max_connections", "model", "options"})
    typ = f.get("type", str, "http")
    if typ not in ("http", "llama_cpp"):
        raise f.error("type", f"upstreams.{name}.type must be http or llama_cpp, got {typ!r}")
    base_url = f.get("base_url", str, "", required=typ == "http").rstrip("/")
    if typ == "http" and not base_url.startswith(("http://", "https://")):
        raise f.error("base_url", f"upstreams.{name}.base_url must start with http:// or https://")
    dialect = f.get("dialect", str, "openai")
    if dialect not in DIALECTS:
        raise f.error("dialect", f"upstreams.{name}.dialect must be one of {', '.join(DIALECTS)}")
    key_env = f.get("api_key_env", str)
    if key_env and key_env.startswith(("sk-", "Bearer")):
        raise f.error("api_key_env", "api_key_env names an environment variable; never put a key in the file")
    return UpstreamConfig(
        name=name, type=typ, base_url=base_url, dialect=dialect, api_key_env=key_env,
        timeouts=_timeouts(f.obj["timeouts"], file) if "timeouts" in f.obj else Timeouts(),
        max_connections=f.get("max_connections", int, 1000),
        model=f.get("model", str), options=dict(f.get("options", dict, {})),
    )


TOP_KEYS = {"listen", "upstreams", "routes", "keys", "limits", "policy", "policy_dirs", "audit", "shutdown_grace_s",
            "responses_state"}


def parse(obj: object, file: str | None = None) -> GatewayConfig:
    top = Fields(obj if obj is not None else {}, file, "config", TOP_KEYS)
    cfg = GatewayConfig(source=file)
    if "listen" in top.obj:
        lf = Fields(top.obj["listen"], file, "listen", {"host", "port"})
        cfg.host = lf.get("host", str, cfg.host)
        cfg.port = lf.get("port", int, cfg.port)
    ups = top.get("upstreams", dict, {})
    for name, u in ups.items():
        cfg.upstreams[str(name)] = _upstream(str(name), u, file)
    routes = top.get("routes", list, [])
    for i, r in enumerate(routes):
        rf = Fields(r, file, f"routes[{i}]", {"path", "model", "upstream", "policy", "passthrough", *RATE_KEYS})
        up = rf.get("upstream", str, required=True)
        if up not in cfg.upstreams:
            raise rf.error("upstream", f"routes[{i}].upstream {up!r} is not defined under upstreams")
        cfg.routes.append(Route(upstream=up, path=rf.get("path", str), model=rf.get("model", str),
                                policy=rf.get("policy", str),
                                passthrough=_passthrough(rf.get("passthrough", list, []), rf, i),
                                rates=_rates(rf)))
    if not cfg.routes and len(cfg.upstreams) == 1:
        cfg.routes.append(Route(upstream=next(iter(cfg.upstreams))))
    for i, k in enumerate(top.get("keys", list, [])):
        kf = Fields(k, file, f"keys[{i}]", {"name", "key_env", "policy", *RATE_KEYS})
        cfg.keys.append(GatewayKey(name=kf.get("name", str, f"key{i}"), key_env=kf.get("key_env", str, required=True),
                                   policy=kf.get("policy", str), rates=_rates(kf)))
    if "limits" in top.obj:
        lf = Fields(top.obj["limits"], file, "limits", {"max_body_bytes", "max_header_bytes", "send_timeout_s",
                                                         "head_timeout_s", "body_timeout_s", "store", "url",
                                                         "on_store_error", "store_timeout_ms"})
        d = cfg.limits
        cfg.limits = Limits(max_body_bytes=lf.get("max_body_bytes", int, d.max_body_bytes),
                            max_header_bytes=lf.get("max_header_bytes", int, d.max_header_bytes),
                            send_timeout_s=float(lf.get("send_timeout_s", (int, float), d.send_timeout_s)),
                            head_timeout_s=float(lf.get("head_timeout_s", (int, float), d.head_timeout_s)),
                            body_timeout_s=float(lf.get("body_timeout_s", (int, float), d.body_timeout_s)),
                            store=lf.get("store", str, d.store), url=lf.get("url", str, d.url),
                            on_store_error=lf.get("on_store_error", str, d.on_store_error),
                            store_timeout_ms=lf.get("store_timeout_ms", int, d.store_timeout_ms))
        lim = cfg.limits
        if lim.store not in ("memory", "redis"):
            raise lf.error("store", f"limits.store must be memory or redis, got {lim.store!r}")
        if lim.store == "redis" and not (lim.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise lf.error("url", "limits.url must be a redis://, rediss:// or unix:// URL when store is redis")
        if lim.on_store_error not in ("allow", "deny"):
            raise lf.error("on_store_error", "limits.on_store_error must be allow or deny")
        if lim.store_timeout_ms <= 0:
            raise lf.error("store_timeout_ms", "limits.store_timeout_ms must be positive")
    cfg.policy = top.get("policy", str)
    cfg.responses_state = top.get("responses_state", str, cfg.responses_state)
    if cfg.responses_state not in ("upstream", "gateway"):
        raise top.error("responses_state", "responses_state must be upstream or gateway")
    dirs = top.get("policy_dirs", list, None)
    if dirs is not None:
        cfg.policy_dirs = [str(d) for d in dirs]
    if "audit" in top.obj:
        af = Fields(top.obj["audit"], file, "audit", {"path", "content", "max_bytes", "backups"})
        cfg.audit_path = af.get("path", str)
        cfg.audit_content = af.get("content", bool, False)
        cfg.audit_max_bytes = af.get("max_bytes", int, 0)
        cfg.audit_backups = af.get("backups", int, 5)
    cfg.shutdown_grace_s = top.get("shutdown_grace_s", float, cfg.shutdown_grace_s)
    if not cfg.upstreams:
        raise ConfigError("no upstreams defined", file, None)
    return cfg


def _rates(f: Fields) -> Rates:
    """The rate-limit keys of a key or route entry: whole numbers, 0 or more (0 = no limit)."""
    values: dict[str, int | None] = {}
    for k in RATE_KEYS:
        v = f.get(k, int, None)
        if v is not None and (isinstance(v, bool) or v < 0):
            raise f.error(k, f"{k} must be a whole number, 0 or more (0: no limit)")
        values[k] = v
    return Rates(**values)


def _passthrough(names: list[object], rf: Fields, i: int) -> frozenset[str]:
    """A route's `passthrough:` list: endpoint names the policy cannot inspect (gateway.endpoints)."""
    from gateway.endpoints import GUARDED_KINDS, PASSTHROUGH_NAMES, TABLE

    unguarded = {e.name for e in TABLE if e.kind not in GUARDED_KINDS} | set(PASSTHROUGH_NAMES) | {"other"}
    guarded = {e.name for e in TABLE} - unguarded
    for n in names:
        if n in guarded:
            raise rf.error("passthrough", f"routes[{i}].passthrough: {n!r} is guarded by the policy; passthrough "
                           "lists only endpoints it cannot inspect")
        if n not in unguarded:
            raise rf.error("passthrough", f"routes[{i}].passthrough: unknown endpoint {n!r} (known: "
                           f"{', '.join(sorted(unguarded))})")
    return frozenset(str(n) for n in names)


def load_file(path: str | os.PathLike[str]) -> GatewayConfig:
    p = Path(path)
    _warn_if_world_readable(p)
    return parse(load(p), str(p))


def _warn_if_world_readable(p: Path) -> None:
    """Config names env vars, not secrets; still, a world-writable/readable config is a smell."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IWOTH:
        raise ConfigError("config file is world-writable; refusing to load it", p)
    lines = p.read_text(errors="replace").lower().splitlines()
    if mode & stat.S_IROTH and any("key" in ln for ln in lines if not ln.lstrip().startswith("#")):
        log.warning("config %s is world-readable; keep keys in the environment only", p)
