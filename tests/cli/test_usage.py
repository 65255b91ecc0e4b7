"""Usage errors: a short message and exit 2, never a traceback (the real console script)."""

from __future__ import annotations

import pytest

from loraflight import __version__

from .helpers import run_cli


def test_version_prints_the_package_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"loraflight {__version__}"


@pytest.mark.parametrize(
    "args",
    [(), ("card",), ("node",), ("keys",), ("trust",)],
    ids=["bare", "card", "node", "keys", "trust"],
)
def test_a_group_without_a_subcommand_shows_its_help_and_exits_2(args: tuple[str, ...]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "Usage: loraflight" in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("fetch", "x"), "Missing option '--node'"),
        (("ls", "--bogus"), "No such option: --bogus"),
        (("card", "inspect", "--nope", "f"), "No such option: --nope"),
        (("node", "run", "--lissten", "x"), "No such option: --lissten"),
        (("no-such-command",), "No such command"),
        (("sync", "--concurrency", "zero"), "--concurrency"),
    ],
)
def test_usage_errors_are_short_and_exit_2(args: tuple[str, ...], says: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and says in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 6, r.stderr
