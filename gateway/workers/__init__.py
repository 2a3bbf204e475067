"""`guardgate serve --workers N`: worker processes on one port, and what they share.

Modules: `supervisor` (starts, restarts and stops the workers and the machine's guard engine;
forwards SIGHUP), `audit` (one audit file written by every worker), `metrics` (/metrics summed over
workers through prometheus_client's multiprocess mode).
"""
