"""YAML loading that remembers where every value came from, for errors that name file:line.

`load(path)` returns plain dicts/lists (subclasses that carry line numbers) with `${ENV}` and
`${ENV:-default}` interpolated in strings. `ConfigError` formats as `file:line: message`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    def __init__(self, message: str, file: str | os.PathLike[str] | None = None, line: int | None = None) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        where = self.file or "<config>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")


class LDict(dict):
    """A mapping that knows its own line and each key's line (1-based)."""

    line: int = 0
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LList(list):
    line: int = 0
    item_lines: list[int]

    def line_of(self, i: int) -> int:
        return self.item_lines[i] if i < len(self.item_lines) else self.line


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LDict:
    d = LDict()
    d.line = node.start_mark.line + 1
    d.key_lines = {}
    for knode, vnode in node.value:
        key = loader.construct_object(knode, deep=True)
        if key in d:
            raise ConfigError(f"duplicate key {key!r}", loader.name, knode.start_mark.line + 1)
        d[key] = loader.construct_object(vnode, deep=True)
        d.key_lines[str(key)] = knode.start_mark.line + 1
    return d


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LList:
    lst = LList(loader.construct_object(n, deep=True) for n in node.value)
    lst.line = node.start_mark.line + 1
    lst.item_lines = [n.start_mark.line + 1 for n in node.value]
    return lst


def _string(loader: _Loader, node: yaml.ScalarNode) -> str:
    value = loader.construct_scalar(node)

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set", loader.name, node.start_mark.line + 1)

    return _ENV.sub(sub, str(value))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)
_Loader.add_constructor("tag:yaml.org,2002:str", _string)


def loads(text: str, name: str = "<string>") -> Any:
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(f"invalid YAML: {e.problem or e.context}", name,
                          mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()


def load(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", p) from None
    return loads(text, str(p))


def line_of(obj: Any, key: str | int | None = None) -> int | None:
    if isinstance(obj, LDict):
        return obj.line_of(str(key)) if key is not None else obj.line
    if isinstance(obj, LList):
        return obj.line_of(int(key)) if isinstance(key, int) else obj.line
    return None


class Fields:
    """Typed access to one YAML mapping that turns every problem into a file:line ConfigError."""

    def __init__(self, obj: Any, file: str | None, what: str, allowed: set[str]) -> None:
        if not isinstance(obj, dict):
            raise ConfigError(f"{what} must be a mapping", file, line_of(obj))
        self.obj, self.file, self.what = obj, file, what
        for k in obj:
            if k not in allowed:
                raise ConfigError(f"unknown key {k!r} in {what} (allowed: {', '.join(sorted(allowed))})",
                                  file, line_of(obj, k))

    def error(self, key: str | None, msg: str) -> ConfigError:
        return ConfigError(msg, self.file, line_of(self.obj, key))

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise ConfigError(f"{self.what}: missing required key {key!r}", self.file, line_of(self.obj))
            return default
        v = self.obj[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float)):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.error(key, f"{self.what}.{key} must be {names}, got {type(v).__name__}")
        return v
