"""The argparse behaviour every `fastpref` command shares (train, bench, score): a usage error is one line."""

from __future__ import annotations

import argparse


class OneLineErrors:
    """Mixed into an argparse parser: a usage error is one line that points to --help (not the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """The parser of every `fastpref` command."""
