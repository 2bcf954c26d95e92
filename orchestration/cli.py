"""The `asymflow` console script: one entry point, one subcommand per job; heavy imports happen per command."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymflow",
        description=(
            "Convert latent flow-matching transformers (FLUX.2 klein) into pixel-space AsymFlow models "
            "and fine-tune them. Run `asymflow COMMAND --help` for each command."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    prep = sub.add_parser("prep", help="prepare data: shards, cached latents/text embeddings, subspace fit, verify, stats")
    from data_prep.cli import add_prep_commands

    add_prep_commands(prep)

    # --- train / export (orchestration.train_cli) ---
    from orchestration.train_cli import add_train_commands

    add_train_commands(sub)
    # --- end train / export ---

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
