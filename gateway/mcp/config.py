"""`mcp_servers:` in the gateway YAML: MCP servers Guardgate fronts, each at `/mcp/{name}`.

mcp_servers:
  github:
    url: https://api.githubcopilot.com/mcp/     # the server's Streamable HTTP endpoint
    policy: starter                              # the same policies as chat
    key_env: GITHUB_MCP_TOKEN                    # sent as `Authorization: Bearer ...`
    headers: {X-Team: platform}                  # sent on every request (values may use ${ENV})
    binary: withhold                             # withhold | pass: images, audio, blobs
    timeout_s: 300                               # idle time between bytes from the server
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from gateway.yamlio import Fields

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(slots=True)
class McpServerConfig:
    name: str
    url: str
    policy: str | None = None
    key_env: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    binary: str = "withhold"
    timeout_s: float | None = None  # None: an idle stream is never cut by the gateway

    def api_key(self) -> str | None:
        return os.environ.get(self.key_env) if self.key_env else None


def parse_servers(top: Fields) -> dict[str, McpServerConfig]:
    """The `mcp_servers:` mapping of the config's top level (`top`), checked with file:line errors."""
    file = top.file
    servers = top.get("mcp_servers", dict, {})
    out: dict[str, McpServerConfig] = {}
    for name, s in servers.items():
        name = str(name)
        what = f"mcp_servers.{name}"
        f = Fields(s, file, what, {"url", "policy", "key_env", "headers", "binary", "timeout_s"})
        if not _NAME.fullmatch(name):
            raise f.error(
                None,
                f"{what}: a server name is 1-64 letters, digits, '_', '.' or '-' (it is a path segment: /mcp/{{name}})",
            )
        url = f.get("url", str, required=True)
        if not url.startswith(("http://", "https://")):
            raise f.error("url", f"{what}.url must start with http:// or https://")
        key_env = f.get("key_env", str)
        if key_env and key_env.startswith(("sk-", "Bearer")):
            raise f.error("key_env", "key_env names an environment variable; never put a key in the file")
        headers = f.get("headers", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise f.error("headers", f"{what}.headers maps header names to strings")
        binary = f.get("binary", str, "withhold")
        if binary not in ("withhold", "pass"):
            raise f.error("binary", f"{what}.binary must be withhold or pass")
        timeout = f.get("timeout_s", (int, float), None)
        out[name] = McpServerConfig(
            name=name,
            url=url,
            policy=f.get("policy", str),
            key_env=key_env,
            headers=dict(headers),
            binary=binary,
            timeout_s=float(timeout) if timeout else None,
        )
    return out
