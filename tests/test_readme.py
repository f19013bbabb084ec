"""The README is the newcomer's manual: its commands and settings table must match the code."""

import re
from pathlib import Path

from service.config import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_run_and_test_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["./scripts/serve", "./scripts/test"]
    for command in commands:
        assert (REPO / command).stat().st_mode & 0o111, f"{command} is not executable"
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()


def test_every_setting_is_documented() -> None:
    for env_name in Settings.env_names().values():
        assert f"`{env_name}`" in README, f"{env_name} is missing from the README's settings table"


def test_no_placeholders_are_left() -> None:
    assert "{{" not in README
