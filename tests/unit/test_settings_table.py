"""The settings table in exporter.app.config is the one declaration of every setting: the parser, the
env and config file readers and README.md's settings table all follow it."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.app.config import _OTLP_KEYS, _TOP_KEYS, SETTINGS, build_parser, readme_rows

README = Path(__file__).resolve().parents[2] / "README.md"
_SETTING_ROW = re.compile(r"\| `--[a-z-]+` \| `PODNET_[A-Z_]+` \|")


def test_readme_settings_table_is_the_generated_one() -> None:
    rows = [line for line in README.read_text().splitlines() if _SETTING_ROW.match(line)]
    assert rows == readme_rows()


def test_every_setting_has_a_run_flag_env_and_file_key() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {opt for action in run._actions for opt in action.option_strings}
    help_text = run.format_help()
    for setting in SETTINGS:
        assert setting.flag in flags
        assert setting.env in help_text
        if setting.key.startswith("otlp_"):
            assert setting.key.removeprefix("otlp_") in _OTLP_KEYS
        elif setting.in_file:
            assert setting.key in _TOP_KEYS
    assert len({s.key for s in SETTINGS}) == len(SETTINGS)
