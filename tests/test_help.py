"""`--help` of every command states the default of every option that has one."""

from __future__ import annotations

import argparse
import re

import pytest

from extract.cli import parser as extract_parser
from finetune.cli import parser as finetune_parser
from probe.cli import parser as probe_parser


def _parsers(p: argparse.ArgumentParser, name: str):
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


PARSERS = [*_parsers(probe_parser(), "probe"), ("extract", extract_parser()), ("finetune", finetune_parser())]


def _entries(p: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help entry as --help prints it (usage left out), by every flag it has."""
    text = p.format_help().split("\n\n", 1)[1]
    out, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            flags = re.findall(r"(?<![\w-])(--?[\w-]+)", line.split("  ")[1] if line.startswith("  ") else line)
            current = " ".join(line.split())
            for flag in flags:
                out[flag] = current
            last = flags
        elif line.startswith("    ") and current is not None:
            current += " " + " ".join(line.split())
            for flag in last:
                out[flag] = current
        else:
            current = None
    return out


@pytest.mark.parametrize("name, p", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_default_is_stated(name, p):
    entries = _entries(p)
    missing = []
    for action in p._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.default is None or action.default is False or action.default in (argparse.SUPPRESS, []):
            continue
        if "default" not in entries[action.option_strings[-1]]:
            missing.append(action.option_strings[-1])
    assert missing == [], f"{name}: {missing}"
