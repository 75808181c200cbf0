"""The data pipeline: download, extract-paragraphs, add-corpus, stats, tokenize, pack (`python -m pipeline STAGE`)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` of every command line in the project (pipeline stages, train, sample, benchmarks).

    The description keeps its line breaks; each option's default is appended once, as
    "(default: X)". An option with no value to show (None, an off flag, an empty list) gets nothing
    appended: its help says in words what happens when it is not given, where that needs saying.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)
