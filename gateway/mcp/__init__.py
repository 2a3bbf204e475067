"""Guardgate in front of MCP servers (the Model Context Protocol): agents' tool traffic under the same policy.

jsonrpc.py   JSON-RPC 2.0 framing: parse, validate, classify, build errors
methods.py   the method table: which stage guards what each method carries
mapping.py   the policy mapping: texts toward the model → input steps, tools/call → output steps
traffic.py   what the policy does to each message, either direction (HTTP and stdio share it)
proxy.py     the Streamable HTTP reverse proxy at /mcp/{name}
wrap.py      `guardgate mcp wrap -- CMD ARGS...`: a stdio server under the same policy
config.py    `mcp_servers:` in the gateway YAML
metrics.py   messages and checks per server, method and tool
"""
