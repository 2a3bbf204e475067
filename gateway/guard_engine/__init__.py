"""The shared guard engine: guard models loaded once per machine, checks batched across every worker.

`guardgate serve --workers N` starts one (a process listening on a Unix socket) when a policy has
model guards; `guardgate guards serve` runs one on its own (e.g. on a GPU machine, over HTTP) for
many replicas. Workers reach it through `client.EngineClient`; the wire protocol is in `protocol.py`
and docs/deployment.md. Modules: `protocol` (paths, the engine URL, the decode rule), `client`
(HTTP over a Unix socket or TCP, health), `remote_model` (a `LlamaModel` stand-in whose calls go to
the engine), `service` (the engine's aiohttp app), `cli` (`guardgate guards serve`).
"""
