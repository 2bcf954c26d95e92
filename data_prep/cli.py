"""`asymflow prep ...` subcommands (registered on the console script's parser)."""
from __future__ import annotations

import argparse


def add_prep_commands(parser: argparse.ArgumentParser) -> None:
    """Register prep's subcommands; each sets `func(args) -> exit code`."""
    sub = parser.add_subparsers(dest="prep_command", metavar="PREP_COMMAND", required=True)
    del sub  # subcommands are added by data_prep modules as they land
