"""`--help` that states every default: an option whose help does not say its default gets it appended."""

from __future__ import annotations

import argparse


class DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; ' (default: X)' after the help of every option with a
    default (not None, False or empty) that its help does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS or default == [] \
                or not action.option_strings or isinstance(action, argparse._HelpAction):
            return text
        shown = "yes" if default is True else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"
