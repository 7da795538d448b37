"""What every ``python -m ...`` command shares: the settings options and how a bad setting ends it.

Each CLI builds its own argparse parser (its examples in the epilog); these two functions keep
``--settings`` / ``--set`` and the "error: ... , exit 2" rule the same everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.settings import Settings, SettingsError, load_settings, parse_overrides


def add_settings_options(parser: argparse.ArgumentParser, example: str = "llm.max_new_tokens=64") -> None:
    parser.add_argument("--settings", type=Path, help="settings YAML (default ./settings.yaml if present)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a setting, e.g. --set {example} (repeatable)")


def cli_settings(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    """The settings for this run (``extra``: overrides a command's own flags imply, beaten by
    nothing), or exit with status 2 and the problem on stderr."""
    try:
        overrides = parse_overrides(args.overrides)
        for section, values in (extra or {}).items():
            overrides.setdefault(section, {}).update(values)
        return load_settings(args.settings, overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
