"""Run ledger `STORAGE/RUN/ledger.jsonl`: append-only JSON lines of submissions, job states, wandb id and checkpoints.

The ledger lives next to the checkpoints, so resubmitting a run depends on the storage path, not on the memory of a
Ray head that may have been lost. One event per line; readers skip a torn (half-written) last line. Nothing that
looks like a credential is ever written: override values whose key names a token, secret, password or key are
replaced by `<redacted>` before an event is appended.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import fsspec

LEDGER = "ledger.jsonl"
SUBMISSION_PREFIX = "asymflow"
LIVE_STATES = frozenset({"PENDING", "RUNNING"})
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|auth|credential)", re.IGNORECASE)
_SLUG_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


# ----------------------------------------------------------------------------------------------- identity


def run_slug(run: str) -> str:
    """The run name as it appears in a Ray submission id (letters, digits, `_ . -`)."""
    slug = _SLUG_BAD.sub("-", run).strip("-")
    if not slug:
        raise ValueError(f"run name {run!r} has no usable characters for a submission id")
    return slug


def submission_id(run: str, attempt: int) -> str:
    """`asymflow-RUN-ATTEMPT`: derived from the run name, so the same run always maps to the same id family."""
    if attempt < 1:
        raise ValueError(f"attempt must be ≥ 1, got {attempt}")
    return f"{SUBMISSION_PREFIX}-{run_slug(run)}-{attempt}"


def parse_submission_id(sid: str, run: str | None = None) -> tuple[str, int] | None:
    """(run slug, attempt) of an id made by `submission_id`, optionally only for `run`; None otherwise."""
    slug = re.escape(run_slug(run)) if run is not None else r".+"
    m = re.fullmatch(rf"{SUBMISSION_PREFIX}-({slug})-(\d+)", sid)
    return (m.group(1), int(m.group(2))) if m else None


# ----------------------------------------------------------------------------------------------- hygiene


def redact_overrides(overrides: list[str]) -> list[str]:
    """`key=value` overrides with secret-looking keys' values replaced."""
    out = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        out.append(f"{key}=<redacted>" if sep and _SECRET_KEY.search(key) else item)
    return out


def scrub(value: Any) -> Any:
    """Deep copy of a JSON-able value with secret-looking keys' values replaced (dict keys and `k=v` strings)."""
    if isinstance(value, dict):
        return {k: "<redacted>" if _SECRET_KEY.search(str(k)) else scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str) and "=" in value:
        return redact_overrides([value])[0]
    return value


# ----------------------------------------------------------------------------------------------- ledger


def ledger_path(storage: str, run: str) -> str:
    return "/".join([storage.rstrip("/"), run, LEDGER])


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """Events of a ledger file. A torn last line (crash mid-append) is skipped; so is any undecodable line."""
    events = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


@dataclass(frozen=True)
class Ledger:
    """The ledger of one run, at a local path or an fsspec URL."""

    path: str

    @classmethod
    def for_run(cls, storage: str, run: str) -> Ledger:
        return cls(ledger_path(storage, run))

    def read(self) -> list[dict[str, Any]]:
        fs, p = fsspec.core.url_to_fs(self.path)
        if not fs.exists(p):
            return []
        with fs.open(p, "rb") as f:
            return parse_lines(f.read())

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one event `{time, kind, ...fields}` (scrubbed of secrets) and return it."""
        event = {"time": round(time.time(), 3), "kind": kind, **scrub(fields)}
        line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode()
        fs, p = fsspec.core.url_to_fs(self.path)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocols or "local" in protocols:
            # One write of one line: a crash leaves at worst a torn last line, which readers skip.
            with open(p, "ab") as f:
                # A previous writer may have died mid-line: start ours on a fresh line.
                if f.tell() > 0:
                    with open(p, "rb") as r:
                        r.seek(-1, 2)
                        if r.read(1) != b"\n":
                            line = b"\n" + line
                f.write(line)
                f.flush()
        else:
            # Object stores cannot append: rewrite the object (the submitter is the single writer of a run's ledger).
            old = b""
            if fs.exists(p):
                with fs.open(p, "rb") as f:
                    old = f.read()
            if old and not old.endswith(b"\n"):
                old += b"\n"
            with fs.open(p, "wb") as f:
                f.write(old + line)
        return event

    # -------------------------------------------------------------- views

    def submissions(self) -> list[dict[str, Any]]:
        return [e for e in self.read() if e.get("kind") == "submit"]

    def last_submission(self) -> dict[str, Any] | None:
        subs = self.submissions()
        return subs[-1] if subs else None

    def next_attempt(self) -> int:
        """1 + the highest attempt recorded (ids are never reused, even if the ledger has gaps)."""
        attempts = [int(e.get("attempt", 0)) for e in self.submissions()]
        return max(attempts, default=0) + 1

    def last_state(self, sid: str) -> str | None:
        """The last job state recorded for submission `sid`."""
        states = [e["state"] for e in self.read() if e.get("kind") == "state" and e.get("submission_id") == sid]
        return states[-1] if states else None

    def summary(self) -> dict[str, Any]:
        """Latest known facts: last submission, its last recorded state, wandb run id, checkpoint steps."""
        events = self.read()
        subs = [e for e in events if e.get("kind") == "submit"]
        last = subs[-1] if subs else None
        sid = last.get("submission_id") if last else None
        states = [e["state"] for e in events if e.get("kind") == "state" and e.get("submission_id") == sid]
        wandb = [e["wandb_run_id"] for e in events if e.get("wandb_run_id")]
        steps = sorted({int(e["step"]) for e in events if e.get("kind") == "checkpoint" and "step" in e})
        return {
            "submission_id": sid,
            "attempts": len(subs),
            "address": last.get("address") if last else None,
            "state": states[-1] if states else None,
            "wandb_run_id": wandb[-1] if wandb else None,
            "checkpoint_steps": steps,
        }
