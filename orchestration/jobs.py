"""Job lifecycle on a Ray cluster through the Ray Jobs API: `asymflow submit / status / logs / stop / list`.

Run identity is owned by the submitter (DESIGN §4.7): the run name and storage path decide everything. A run's
submissions are Ray jobs `asymflow-RUN-1`, `asymflow-RUN-2`, ... recorded in the run ledger
(`STORAGE/RUN/ledger.jsonl`, orchestration.ledger). Submitting a run whose last job is PENDING/RUNNING prints it and
starts nothing; a FAILED / STOPPED / vanished (head lost) one gets the next attempt, and `asymflow train` resumes from
the run's latest complete checkpoint by itself.

Authentication: Ray 2.60 heads run with token auth. The client sends the token from `$RAY_AUTH_TOKEN`,
`$RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (Ray reads it; we only switch `RAY_AUTH_MODE=token` on when one of
them exists). The token is never printed, logged, put in a runtime_env or written to the ledger.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.job_client import connect, enable_token_auth  # noqa: F401  (part of this module's API)
from orchestration import run_registry
from orchestration.ledger import LIVE_STATES, Ledger, parse_submission_id, redact_overrides, submission_id
from orchestration.stop_request import clear_stop_request, request_stop

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKING_DIR_EXCLUDES = [".venv", ".git", ".cache", "demo-output", "runs", "wandb", "__pycache__", "*.egg-info",
                        ".pytest_cache", "bench/out"]
DEFAULT_STOP_GRACE_S = 300
PYTHON = "python"  # the cluster's interpreter (`cluster up` puts this environment's bin directory first on PATH)
_STEP_LINE = re.compile(r"\[asymflow\] step (\d+)/(\d+) .*?([\d.]+) samples/s.*?eta ([\d.]+) min")
_RESUMED_LINE = re.compile(r"\[asymflow\] resumed from .* \(step (\d+),")
_PREEMPT_LINE = re.compile(r"\[asymflow\] preempted: checkpoint at step (\d+) committed")


# ----------------------------------------------------------------------------------------------- connection


def default_address() -> str | None:
    """$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (Ray's own variable, as `ray job submit` reads it), else the head
    started by `asymflow cluster up` (its state file), else None."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name):
            return os.environ[name]
    from orchestration.cluster import read_state

    state = read_state(os.environ.get("ASYMFLOW_CLUSTER_STATE_DIR"))
    return state["dashboard_url"] if state else None


def job_status(client: Any, sid: str) -> str | None:
    """The job's state name, or None when the cluster does not know it (never submitted there, or head restarted)."""
    try:
        return str(client.get_job_status(sid).value)
    except RuntimeError as exc:  # the SDK raises RuntimeError "... does not exist" for unknown ids
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise


def run_jobs_on_cluster(client: Any, run: str) -> dict[str, Any]:
    """submission id → JobDetails of this run's jobs the cluster knows about."""
    return {j.submission_id: j for j in client.list_jobs()
            if j.submission_id and parse_submission_id(j.submission_id, run)}


# ----------------------------------------------------------------------------------------------- submission


def _is_url(path: str) -> bool:
    return "://" in path


def _abs(path: str | None) -> str | None:
    """Local paths become absolute (the job's cwd is a copy of the repo, not the submitter's cwd); URLs stay."""
    if path is None or _is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


@dataclass
class SubmitArgs:
    config: str
    name: str | None = None
    storage: str | None = None
    data: str | None = None
    steps: int | None = None
    workers: int | None = None
    overrides: list[str] = field(default_factory=list)
    prep: str | None = None  # image input for `prep shards` (then `prep cache` + `prep subspace`)
    prep_resolution: int = 1024
    working_dir: str | None = str(REPO_ROOT)  # None: the cluster already has the project installed
    stop_grace_s: int = DEFAULT_STOP_GRACE_S
    requirements: str | None = None  # pip requirements file for the runtime_env (needs the cluster to reach PyPI)
    # The submitter's own choices that the job's driver and workers must see (never secrets: no WANDB_API_KEY).
    forward_env: dict[str, str] = field(default_factory=dict)


FORWARDED_ENV = ("WANDB_MODE", "HF_HUB_OFFLINE")  # the user's environment wins over our offline defaults


def config_path_for_job(config: str, working_dir: str | None) -> str:
    """CONFIG as the job sees it: relative to the uploaded working_dir when inside it, else absolute (or a URL)."""
    if _is_url(config):
        return config
    path = Path(config).expanduser().resolve()
    if working_dir is not None:
        try:
            return str(path.relative_to(Path(working_dir).resolve()))
        except ValueError:
            pass
    return str(path)


def build_entrypoint(a: SubmitArgs, run: str, storage: str, data: str) -> str:
    """`python -m orchestration.cli train ...` (after the prep steps with --prep); every value shell-quoted.
    `--address auto`: inside a job the driver joins the job's cluster instead of starting a local Ray."""
    cli = [PYTHON, "-m", "orchestration.cli"]
    config = config_path_for_job(a.config, a.working_dir)
    train = [*cli, "train", config, "--data", data, "--storage", storage, "--name", run, "--address", "auto"]
    if a.steps is not None:
        train += ["--steps", str(a.steps)]
    if a.workers is not None:
        train += ["--workers", str(a.workers)]
    for item in a.overrides:
        train += ["--set", item]
    command = shlex.join(train)
    if a.prep:
        prep = " && ".join(shlex.join(c) for c in (
            [*cli, "prep", "shards", _abs(a.prep), data, "--resolution", str(a.prep_resolution), "--no-progress"],
            [*cli, "prep", "cache", data, "--config", config],
            [*cli, "prep", "subspace", data, "--config", config],
        ))
        if _is_url(data):  # each prep step resumes / skips finished work itself
            command = f"{prep} && {command}"
        else:  # a finished prep (its last artifact exists) is not redone by later attempts
            done = shlex.quote(f"{data.rstrip('/')}/subspace.safetensors")
            command = f"{{ test -e {done} || {{ {prep}; }}; }} && {command}"
    return command


def build_runtime_env(a: SubmitArgs) -> dict[str, Any]:
    env: dict[str, Any] = {
        "env_vars": {
            # How long the job server waits after SIGTERM before SIGKILL on `stop_job` (read by the job supervisor,
            # which runs with the job's runtime_env): room for a driver that checkpoints on SIGTERM.
            "RAY_JOB_STOP_WAIT_TIME_S": str(int(a.stop_grace_s)),
            "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            **{k: v for k, v in a.forward_env.items() if k in FORWARDED_ENV},
        }
    }
    if a.working_dir is not None:
        env["working_dir"] = a.working_dir
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if a.requirements:
        env["pip"] = [line.strip() for line in Path(a.requirements).read_text().splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
    return env


@dataclass
class Resolved:
    """What a submission resolves to before anything is sent."""

    run: str
    storage: str
    data: str
    total_steps: int
    config_hash: str
    run_dir: str


def resolve(a: SubmitArgs) -> Resolved:
    """Load and validate CONFIG with the flags applied (a bad config fails here, before any job exists)."""
    from orchestration.config import load_config
    from orchestration.train_cli import cli_flags

    flags, names = cli_flags(argparse.Namespace(data=_abs(a.data), storage=_abs(a.storage), name=a.name,
                                                steps=a.steps, workers=a.workers, address=None))
    cfg = load_config(a.config, a.overrides, flags, names)
    storage = _abs(cfg.run.storage)
    return Resolved(run=cfg.run.name, storage=storage, data=_abs(str(cfg.data.path)), total_steps=cfg.train.steps,
                    config_hash=cfg.config_hash(), run_dir=f"{storage.rstrip('/')}/{cfg.run.name}")


def find_live(client: Any, run: str, ledger: Ledger) -> tuple[str, str] | None:
    """(submission id, state) of a PENDING/RUNNING job of this run: the ledger's last one, or any `asymflow-RUN-N`
    the cluster knows (a submitter that crashed before writing the ledger)."""
    last = ledger.last_submission()
    if last is not None:
        state = job_status(client, last["submission_id"])
        if state in LIVE_STATES:
            return last["submission_id"], state
    for sid, job in sorted(run_jobs_on_cluster(client, run).items()):
        if str(job.status.value) in LIVE_STATES:
            return sid, str(job.status.value)
    return None


def submit(a: SubmitArgs, address: str | None = None, again: bool = False, out=print) -> dict[str, Any]:
    """Submit (or not) one attempt of the run. Returns {"action": "submitted"|"live"|"done", "submission_id", ...}.
    Without `address`: the run's last submission address, else `default_address()`."""
    r = resolve(a)
    ledger = Ledger.for_run(r.storage, r.run)
    last = ledger.last_submission()
    address = address or (last.get("address") if last else None) or default_address()
    if address is None:
        raise ValueError("no --address, no earlier submission of this run and no head from `asymflow cluster up`")
    client = connect(address)
    live = find_live(client, r.run, ledger)
    if live is not None:
        sid, state = live
        record_state(ledger, sid, state)
        out(f"run {r.run} is already live as job {sid} ({state}); not starting a second copy")
        return {"action": "live", "submission_id": sid, "state": state, "run": r.run, "storage": r.storage,
                "address": address}
    if last is not None and not again and job_status(client, last["submission_id"]) == "SUCCEEDED":
        record_state(ledger, last["submission_id"], "SUCCEEDED")
        out(f"run {r.run} already succeeded as job {last['submission_id']}; pass --again for a new attempt "
            f"(e.g. with a larger --steps)")
        return {"action": "done", "submission_id": last["submission_id"], "state": "SUCCEEDED", "run": r.run,
                "storage": r.storage, "address": address}
    on_cluster = [parse_submission_id(s, r.run)[1] for s in run_jobs_on_cluster(client, r.run)]
    attempt = max([ledger.next_attempt(), *(n + 1 for n in on_cluster)])
    sid = submission_id(r.run, attempt)
    resume_step = latest_checkpoint_step(r.run_dir)
    entrypoint = build_entrypoint(a, r.run, r.storage, r.data)
    client.submit_job(
        entrypoint=entrypoint,
        submission_id=sid,
        runtime_env=build_runtime_env(a),
        metadata={"asymflow_run": r.run, "asymflow_storage": r.storage, "asymflow_attempt": str(attempt)},
        entrypoint_num_cpus=0,
    )
    ledger.append(
        "submit", submission_id=sid, attempt=attempt, address=address, config_hash=r.config_hash,
        resume_from_step=resume_step, total_steps=r.total_steps,
        args={"config": a.config, "data": r.data, "storage": r.storage, "steps": a.steps, "workers": a.workers,
              "overrides": redact_overrides(a.overrides), "prep": _abs(a.prep), "working_dir": a.working_dir},
    )
    record_state(ledger, sid, "PENDING")
    start = f"resumes from checkpoint step {resume_step}" if resume_step else "starts from the pretrained init"
    out(f"submitted {sid} (run {r.run}, attempt {attempt}; {start}) to {address}")
    return {"action": "submitted", "submission_id": sid, "attempt": attempt, "run": r.run, "resume_from": resume_step,
            "storage": r.storage, "address": address}


# ----------------------------------------------------------------------------------------------- observation


def latest_checkpoint_step(run_dir: str) -> int | None:
    """Highest step with a COMPLETE marker (orchestration.checkpoint's rule), or None."""
    try:
        from orchestration import checkpoint as ckpt

        steps = ckpt.complete_steps(run_dir)
    except (OSError, ValueError):
        return None
    return steps[-1] if steps else None


def read_progress(run_dir: str) -> dict[str, Any] | None:
    """{step, total, samples_per_s, eta_s, time} of the last logged step: `RUN_DIR/progress.json` (every storage
    kind), else the last line of a local `metrics.jsonl` (runs from before progress.json); None when nothing logged."""
    import fsspec

    from orchestration.progress import read_progress_file

    latest = read_progress_file(run_dir)
    if latest is not None:
        return latest
    try:
        fs, p = fsspec.core.url_to_fs(f"{run_dir.rstrip('/')}/metrics.jsonl")
        if not fs.exists(p):
            return None
        with fs.open(p, "rb") as f:
            lines = [line for line in f.read().decode().splitlines() if line.strip()]
        for line in reversed(lines):  # a line being appended right now may be torn
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            return {"step": rec.get("step"), "total": rec.get("total_steps"), "samples_per_s": rec.get("samples_per_s"),
                    "eta_s": rec.get("eta_s"), "time": rec.get("time")}
        return None
    except OSError:
        return None


def progress_from_logs(logs: str) -> dict[str, Any]:
    """Facts in the driver's log: the last `step N/T ... samples/s ... eta` line, resume and preemption lines."""
    facts: dict[str, Any] = {}
    steps = _STEP_LINE.findall(logs)
    if steps:
        step, total, sps, eta_min = steps[-1]
        facts.update(step=int(step), total=int(total), samples_per_s=float(sps), eta_s=float(eta_min) * 60)
    resumed = _RESUMED_LINE.findall(logs)
    if resumed:
        facts["resumed_from"] = [int(s) for s in resumed]
    preempted = _PREEMPT_LINE.findall(logs)
    if preempted:
        facts["preempted_at"] = [int(s) for s in preempted]
    return facts


def record_state(ledger: Ledger, sid: str, state: str | None) -> None:
    """Append a state event when it changed since the last one recorded for `sid`."""
    if state is not None and ledger.last_state(sid) != state:
        ledger.append("state", submission_id=sid, state=state)


def record_checkpoint(ledger: Ledger, run_dir: str, step: int | None) -> None:
    """Append the latest checkpoint step (and the wandb run id from its state.json) when not yet recorded."""
    if step is None:
        return
    seen = {int(e["step"]) for e in ledger.read() if e.get("kind") == "checkpoint" and "step" in e}
    if step in seen:
        return
    wandb_id = None
    try:
        from orchestration import checkpoint as ckpt

        wandb_id = ckpt.read_state(ckpt.checkpoint_dir(run_dir, step)).get("wandb_run_id")
    except (OSError, ValueError, KeyError):
        pass
    ledger.append("checkpoint", step=step, wandb_run_id=wandb_id)


def run_status(storage: str, run: str, address: str | None = None) -> dict[str, Any]:
    """State, step, last checkpoint, samples/s, ETA of a run; records what is new in its ledger."""
    storage = _abs(storage)
    run_dir = f"{storage.rstrip('/')}/{run}"
    ledger = Ledger.for_run(storage, run)
    last = ledger.last_submission()
    info: dict[str, Any] = {"run": run, "run_dir": run_dir, "submission_id": None, "state": None, "step": None,
                            "total": last.get("total_steps") if last else None, "last_checkpoint": None,
                            "samples_per_s": None, "eta_s": None, "attempts": len(ledger.submissions())}
    ckpt_step = latest_checkpoint_step(run_dir)
    info["last_checkpoint"] = ckpt_step
    info["step"] = ckpt_step
    record_checkpoint(ledger, run_dir, ckpt_step)
    address = address or (last.get("address") if last else None)
    if last is not None:
        sid = info["submission_id"] = last["submission_id"]
        info["state"] = ledger.last_state(sid)
        info["state_source"] = "ledger"
        if address:
            try:
                client = connect(address)
                state = job_status(client, sid)
                info["state"] = state or "LOST"  # the head no longer knows the job (restarted or replaced)
                info["state_source"] = "cluster"
                record_state(ledger, sid, info["state"])
                if state is not None:
                    info.update(progress_from_logs(client.get_job_logs(sid)))
            except Exception as exc:  # head unreachable: report what the ledger knows
                info["cluster_error"] = f"{type(exc).__name__}: {exc}"[:200]
    progress = read_progress(run_dir)
    if progress:
        info.update({k: progress[k] for k in ("step", "total", "samples_per_s", "eta_s") if k in progress})
    if info["state"] not in LIVE_STATES:
        info["eta_s"] = None  # samples/s stays: the last measured rate of a finished or dead job
    info["wandb_run_id"] = ledger.summary()["wandb_run_id"]
    return info


def format_status(info: dict[str, Any]) -> str:
    def fmt(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v}{unit}"

    step = "-" if info.get("step") is None else f"{info['step']}" + (f"/{info['total']}" if info.get("total") else "")
    sps = "-" if info.get("samples_per_s") is None else f"{info['samples_per_s']:.1f}"
    eta = "-" if info.get("eta_s") is None else f"{info['eta_s'] / 60:.1f} min"
    lines = [f"run {info['run']} ({info['run_dir']})",
             f"  job {fmt(info.get('submission_id'))} [{fmt(info.get('state'))}], attempts {info.get('attempts', 0)}",
             f"  step {step}, last checkpoint {fmt(info.get('last_checkpoint'))}, samples/s {sps}, eta {eta}"]
    if info.get("wandb_run_id"):
        lines.append(f"  wandb run {info['wandb_run_id']}")
    if info.get("cluster_error"):
        lines.append(f"  cluster unreachable: {info['cluster_error']}")
    return "\n".join(lines)


def list_runs(storage: str | list[str] | None, address: str | None) -> list[dict[str, Any]]:
    """Every run with a ledger under `storage` (one root or several), plus (with `address`) asymflow jobs of the
    cluster not in them."""
    import fsspec

    rows: list[dict[str, Any]] = []
    known: set[str] = set()
    for storage in [storage] if isinstance(storage, str) else storage or []:
        fs, root = fsspec.core.url_to_fs(_abs(storage))
        if fs.exists(root):
            for entry in sorted(fs.ls(root, detail=False)):
                run = entry.rstrip("/").rsplit("/", 1)[-1]
                if fs.exists(f"{entry.rstrip('/')}/ledger.jsonl"):
                    info = run_status(storage, run, address)
                    rows.append(info)
                    known.update(e["submission_id"] for e in Ledger.for_run(_abs(storage), run).submissions())
    if address:
        client = connect(address)
        for job in client.list_jobs():
            sid = job.submission_id or ""
            if parse_submission_id(sid) is None or sid in known or (job.metadata or {}).get("asymflow_helper"):
                continue
            meta = job.metadata or {}
            rows.append({"run": meta.get("asymflow_run", sid), "run_dir": None, "submission_id": sid,
                         "state": str(job.status.value), "step": None, "total": None, "last_checkpoint": None,
                         "samples_per_s": None, "eta_s": None,
                         **({} if str(job.status.value) not in LIVE_STATES
                            else progress_from_logs(client.get_job_logs(sid)))})
    return rows


# ----------------------------------------------------------------------------------------------- stop

def _wait_terminal(client: Any, sid: str, timeout_s: float) -> str | None:
    deadline = time.time() + timeout_s
    while True:
        state = job_status(client, sid)
        if state not in LIVE_STATES or time.time() > deadline:
            return state
        time.sleep(1.0)


def stopped_event(ledger: Ledger, request_id: str) -> dict[str, Any] | None:
    """The `stopped` event rank 0 appends after committing the checkpoint of stop request `request_id`."""
    return next((e for e in reversed(ledger.read()) if e.get("kind") == "stopped"
                 and e.get("request_id") == request_id), None)


def stop_run(storage: str, run: str, address: str | None = None, now: bool = False,
             timeout_s: float = DEFAULT_STOP_GRACE_S, out=print) -> dict[str, Any]:
    """Graceful stop: write the run's stop marker (orchestration.stop_request), then `stop_job` — Ray SIGTERMs the
    driver, which keeps waiting while every rank sees the marker at the next step boundary, commits a checkpoint and
    returns; the driver then exits and the job ends STOPPED. This waits for the job to end and reads the stop's step
    from the ledger. Stock `ray job stop` takes the same path (the driver writes the marker on SIGTERM).
    `now`: the driver exits at once, no checkpoint."""
    storage = _abs(storage)
    run_dir = f"{storage.rstrip('/')}/{run}"
    ledger = Ledger.for_run(storage, run)
    last = ledger.last_submission()
    address = address or (last.get("address") if last else None)
    if address is None:
        raise ValueError(f"no job address: {ledger.path} has no submission and no --address was given")
    client = connect(address)
    live = find_live(client, run, ledger)
    if live is None:
        out(f"run {run} has no live job; nothing to stop")
        return {"action": "not-live", "run": run}
    sid, _ = live
    before = latest_checkpoint_step(run_dir)
    request = request_stop(run_dir, source="asymflow stop", now=now, submission_id=sid)
    ledger.append("stop_requested", submission_id=sid, graceful=not now, checkpoint_before=before,
                  request_id=request["id"])
    client.stop_job(sid)
    out(f"asked job {sid} to {'stop now' if now else 'checkpoint at the next step and stop'}")
    state = _wait_terminal(client, sid, timeout_s)
    event = stopped_event(ledger, request["id"])
    checkpoint = int(event["step"]) if event else None
    if state in LIVE_STATES:
        out(f"job {sid} still {state} after {timeout_s:.0f}s; Ray kills it after its stop grace (submit "
            f"--stop-grace); the stop request stays in {run_dir}")
    else:
        clear_stop_request(run_dir)  # not consumed (e.g. the job ended before a step boundary): never stop a later one
    if checkpoint is not None:
        out(f"checkpoint at step {checkpoint} committed")
    elif not now:
        out(f"the job ended without a stop checkpoint (last complete: {latest_checkpoint_step(run_dir)})")
    record_state(ledger, sid, state)
    latest = latest_checkpoint_step(run_dir)
    record_checkpoint(ledger, run_dir, latest)
    out(f"job {sid} {state}; resubmit the same run to resume from step {latest}")
    return {"action": "stopped", "submission_id": sid, "state": state, "checkpoint": checkpoint}


# ----------------------------------------------------------------------------------------------- logs


def run_logs(storage: str, run: str, address: str | None = None, follow: bool = False, attempt: int | None = None,
             write=sys.stdout.write) -> int:
    ledger = Ledger.for_run(_abs(storage), run)
    subs = ledger.submissions()
    if attempt is not None:
        subs = [s for s in subs if int(s.get("attempt", 0)) == attempt]
    if not subs:
        raise ValueError(f"no submission of run {run} in {ledger.path}")
    sub = subs[-1]
    client = connect(address or sub["address"])
    sid = sub["submission_id"]
    if not follow:
        write(client.get_job_logs(sid))
        return 0

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    return 0


# ----------------------------------------------------------------------------------------------- CLI


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """Register submit / status / logs / stop / list on the console script's subparsers."""
    storage_help = "storage root holding STORAGE/RUN/ledger.jsonl [where `submit` put the run, else runs]"
    addr_help = "job server, http://HOST:PORT [the run's last submission address]"

    p = sub.add_parser("submit", help="submit `asymflow train` as a Ray job (idempotent per run name; resumes)",
                       description="Submit CONFIG as Ray job asymflow-RUN-N. A live job of the same run is never "
                       "duplicated; a failed/stopped one gets a new attempt that resumes from the latest checkpoint.")
    p.add_argument("config", metavar="CONFIG", help="run config YAML (inside the repo: sent relative to it)")
    p.add_argument("--address", help="job server (dashboard) http://HOST:PORT — not the GCS address `train --address` "
                   "takes [the run's last one, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else `cluster up`'s head]")
    p.add_argument("--name", help="run name (run.name)")
    p.add_argument("--storage", help="storage root (run.storage); local paths are made absolute")
    p.add_argument("--data", help="dataset directory or URL (data.path)")
    p.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    p.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable)")
    p.add_argument("--prep", metavar="IMAGES", help="first build DATA from these images: prep shards + cache + "
                   "subspace (skipped once DATA/subspace.safetensors exists)")
    p.add_argument("--prep-resolution", type=int, default=1024, metavar="N", help="prep shards --resolution [1024]")
    p.add_argument("--no-working-dir", action="store_true",
                   help="do not upload the repo; the cluster's Python already has the project installed")
    p.add_argument("--requirements", metavar="FILE", help="pip requirements for the job's runtime_env")
    p.add_argument("--stop-grace", type=int, default=DEFAULT_STOP_GRACE_S, metavar="S",
                   help=f"seconds between SIGTERM and SIGKILL when the job is stopped [{DEFAULT_STOP_GRACE_S}]")
    p.add_argument("--again", action="store_true", help="submit a new attempt even if the last one succeeded")
    p.set_defaults(func=_run_submit)

    p = sub.add_parser("status", help="state, step, last checkpoint, samples/s and ETA of a run")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--address", help=addr_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_status)

    p = sub.add_parser("logs", help="driver logs of a run's latest job (or --attempt N)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--address", help=addr_help)
    p.add_argument("--attempt", type=int, help="which submission [latest]")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(func=_run_logs)

    p = sub.add_parser("stop", help="stop a run gracefully: checkpoint at the next step, then the job ends",
                       description="Writes RUN_DIR/STOP and stops the job; every worker sees the request at the next "
                       "step boundary, commits a checkpoint and ends. `ray job stop ID` does the same.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--address", help=addr_help)
    p.add_argument("--now", action="store_true", help="no checkpoint: stop the job right away (work since the "
                   "last checkpoint is lost)")
    p.add_argument("--timeout", type=float, default=DEFAULT_STOP_GRACE_S, help="seconds to wait for the job "
                   f"to end [{DEFAULT_STOP_GRACE_S}]")
    p.set_defaults(func=_run_stop)

    p = sub.add_parser("list", help="runs under a storage path (and asymflow jobs on a cluster)")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--address", help="also list asymflow jobs of this cluster not in the storage's ledgers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_list)


# Errors propagate to `orchestration.cli.main`, which prints one `error:` line with the exit code for its kind.


def _run_submit(args: argparse.Namespace) -> int:
    a = SubmitArgs(config=args.config, name=args.name, storage=args.storage, data=args.data, steps=args.steps,
                   workers=args.workers, overrides=args.overrides, prep=args.prep,
                   prep_resolution=args.prep_resolution, working_dir=None if args.no_working_dir else str(REPO_ROOT),
                   stop_grace_s=args.stop_grace, requirements=args.requirements,
                   forward_env={k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    result = submit(a, args.address, again=args.again)
    run_registry.remember(run_registry.home_dir(), result["run"], result["storage"], result.get("address"))
    return 0


def _storage(args: argparse.Namespace) -> str:
    """--storage, else where `submit` put this run (orchestration.run_registry), else `runs`."""
    return run_registry.storage_of(run_registry.home_dir(), args.run, args.storage)


def _run_status(args: argparse.Namespace) -> int:
    args.storage = _storage(args)
    info = run_status(args.storage, args.run, args.address)
    if info["submission_id"] is None:
        raise ValueError(f"no submission of run {args.run} under {args.storage}")
    print(json.dumps(info, indent=2) if args.json else format_status(info))
    return 0


def _run_logs(args: argparse.Namespace) -> int:
    return run_logs(_storage(args), args.run, args.address, args.follow, args.attempt)


def _run_stop(args: argparse.Namespace) -> int:
    stop_run(_storage(args), args.run, args.address, now=args.now, timeout_s=args.timeout)
    return 0


def _run_list(args: argparse.Namespace) -> int:
    rows = list_runs(run_registry.storages(run_registry.home_dir(), args.storage), args.address or None)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no runs")
        return 0
    print(f"{'RUN':<20} {'JOB':<28} {'STATE':<10} {'STEP':>9} {'CKPT':>6} {'SAMPLES/S':>9} {'ETA':>9}")
    for r in rows:
        step = "-" if r.get("step") is None else f"{r['step']}" + (f"/{r['total']}" if r.get("total") else "")
        sps = "-" if r.get("samples_per_s") is None else f"{r['samples_per_s']:.1f}"
        eta = "-" if r.get("eta_s") is None else f"{r['eta_s'] / 60:.1f}m"
        print(f"{r['run']:<20} {r.get('submission_id') or '-':<28} {r.get('state') or '-':<10} {step:>9} "
              f"{'-' if r.get('last_checkpoint') is None else r['last_checkpoint']:>6} {sps:>9} {eta:>9}")
    return 0
