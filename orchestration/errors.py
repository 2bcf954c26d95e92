"""How the console script reports errors: one `error: ...` line, exit 2 for usage/config errors, 1 for the rest."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import NoReturn

EXIT_USAGE = 2  # bad arguments, config, paths, addresses: something the user can fix in the command
EXIT_FAILED = 1  # the command ran and failed (training failed, verify found problems, an internal error)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line error: `error: asymflow train: the following arguments are required:
    CONFIG (see asymflow train --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def is_usage_error(exc: BaseException) -> bool:
    """Errors the user fixes in the command: bad values/configs (ValueError: ConfigError, pydantic's
    ValidationError, FormatError, ...), missing/unreadable paths, malformed files, unreachable addresses."""
    import yaml

    return isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                            KeyError, yaml.YAMLError, ConnectionError, TimeoutError, UnicodeDecodeError))


def describe(exc: BaseException) -> str:
    """One line naming what went wrong and, where the exception knows it, the path."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split()) if str(exc) else type(exc).__name__
    return f"missing key {text}" if isinstance(exc, KeyError) else text


def report_error(exc: BaseException, debug: bool = False) -> int:
    """Print the error (a traceback too with `debug`) and return the exit code."""
    if debug:
        traceback.print_exception(exc)
    usage = is_usage_error(exc)
    hint = "" if usage or debug else f" ({type(exc).__name__}; --debug shows the traceback)"
    print(f"error: {describe(exc)}{hint}", file=sys.stderr)
    return EXIT_USAGE if usage else EXIT_FAILED
