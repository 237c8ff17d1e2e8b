"""CLI argument handling that needs no running agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import _protect_kids, main


def test_a_kid_starting_with_a_dash_is_not_taken_for_an_option() -> None:
    assert _protect_kids(["revoke", "-Xy_z"]) == ["revoke", "--", "-Xy_z"]
    assert _protect_kids(["--socket", "/s", "revoke", "-a"]) == [
        "--socket",
        "/s",
        "revoke",
        "--",
        "-a",
    ]
    assert _protect_kids(["revoke", "abc"]) == ["revoke", "abc"]
    assert _protect_kids(["revoke", "--help"]) == ["revoke", "--help"]


def test_unreachable_agent_exits_3_naming_the_socket(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--socket", str(short_tmp / "x.sock"), "revoke", "-dashkid"]) == 3
    assert str(short_tmp / "x.sock") in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "rotate" in capsys.readouterr().out
