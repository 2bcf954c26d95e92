"""A Ray job-server client with token authentication (Ray 2.60 heads require it); the token is never printed.

Shared by `cluster up` (waiting for its job server) and the job lifecycle commands (orchestration.jobs).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def enable_token_auth(environ: dict[str, str] | None = None) -> bool:
    """Switch the Ray client to token auth when a token is available (and the user did not choose a mode). Must run
    before Ray reads its config; if `ray._raylet` is already loaded its cached config is refreshed."""
    env = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" in env:
        return env["RAY_AUTH_MODE"].lower() == "token"
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    has_token = bool(env.get("RAY_AUTH_TOKEN")) or bool(token_path and Path(token_path).exists()) or (
        Path.home() / ".ray" / "auth_token").exists()
    if not has_token:
        return False
    env["RAY_AUTH_MODE"] = "token"
    if environ is None and "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")
    return True


def connect(address: str):
    """A JobSubmissionClient for the job server at `address` (http://HOST:PORT), token auth included."""
    enable_token_auth()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)
