"""The `asymflow` console script: one entry point, one subcommand per job; heavy imports happen per command."""
from __future__ import annotations

import argparse
import os
import sys

from orchestration.errors import ArgumentParser, report_error


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="asymflow",
        description=(
            "Convert latent flow-matching transformers (FLUX.2 klein) into pixel-space AsymFlow models "
            "and fine-tune them. Run `asymflow COMMAND --help` for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also ASYMFLOW_DEBUG=1; accepted anywhere)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    prep = sub.add_parser("prep", help="prepare data: shards, cached latents/text embeddings, subspace fit, verify, stats; LPIPS weights")
    from data_prep.cli import add_prep_commands

    add_prep_commands(prep)

    # --- train / export (orchestration.train_cli) ---
    from orchestration.train_cli import add_train_commands

    add_train_commands(sub)
    # --- end train / export ---

    # --- sample: PNGs from a run, export, merged model, pipeline or the official adapter (orchestration.sample_cli) ---
    from orchestration.sample_cli import add_sample_command

    add_sample_command(sub)
    # --- end sample ---

    # --- job lifecycle: cluster up/down, submit, status, logs, stop, list (orchestration.cluster, .jobs) ---
    from orchestration.cluster import add_cluster_commands
    from orchestration.jobs import add_job_commands

    add_cluster_commands(sub)
    add_job_commands(sub)
    # --- end job lifecycle ---

    # --- serve: the generation page (orchestration.serve; Gradio imported only when it runs) ---
    from orchestration.serve import add_serve_command

    add_serve_command(sub)
    # --- end serve ---
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asymflow")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command. Every error ends as one `error: ...` line on stderr and an exit code (2 for
    usage/config errors); the traceback only with `--debug` or ASYMFLOW_DEBUG=1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ASYMFLOW_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as exc:  # argparse (usage error: 2; --help/--version: 0) or `raise SystemExit("message")`
        if isinstance(exc.code, str):
            return report_error(ValueError(exc.code), debug)
        return 0 if exc.code is None else int(exc.code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (the one place every command's errors become a message)
        return report_error(exc, debug)


if __name__ == "__main__":
    sys.exit(main())
