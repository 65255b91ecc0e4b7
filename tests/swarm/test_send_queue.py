"""The one kernel setting the swarm's speed depends on (`net.ipv4.tcp_notsent_lowat`): the
node's note about it, reading it in a real network namespace, and deploy/ setting it."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraflight.federation.swarm.settings import (
    SEND_QUEUE_BYTES,
    SEND_QUEUE_NOTE_ABOVE,
    log_send_queue_note,
    read_send_queue_limit,
    send_queue_note,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_note_names_the_setting_only_when_it_is_unset_or_large() -> None:
    unset = send_queue_note(4294967295)
    assert unset is not None and "unset (the kernel default)" in unset
    assert "net.ipv4.tcp_notsent_lowat" in unset and str(SEND_QUEUE_BYTES) in unset
    large = send_queue_note(SEND_QUEUE_NOTE_ABOVE + 1)
    assert large is not None and f"{SEND_QUEUE_NOTE_ABOVE + 1} bytes" in large
    assert send_queue_note(SEND_QUEUE_BYTES) is None
    assert send_queue_note(SEND_QUEUE_NOTE_ABOVE) is None
    assert send_queue_note(None) is None  # not Linux, or /proc unreadable: nothing to say


def test_reading_the_setting(tmp_path: Path) -> None:
    f = tmp_path / "tcp_notsent_lowat"
    f.write_text("16384\n")
    assert read_send_queue_limit(f) == 16384
    f.write_text("not a number\n")
    assert read_send_queue_limit(f) is None
    assert read_send_queue_limit(tmp_path / "missing") is None


@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("sysctl") is None, reason="needs util-linux and procps"
)
def test_a_node_reads_its_own_network_namespace() -> None:
    """Inside a private network namespace (this machine's own setting is untouched) the value
    set there is what the node reads, and then it has nothing to note."""
    code = (
        "from loraflight.federation.swarm.settings import read_send_queue_limit, send_queue_note\n"
        "v = read_send_queue_limit(); print(v, send_queue_note(v))\n"
    )
    r = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f'sysctl -q -w net.ipv4.tcp_notsent_lowat={SEND_QUEUE_BYTES} && {sys.executable} -c "$0"',
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("unshare -n needs root")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(SEND_QUEUE_BYTES), "None"]


def test_the_note_goes_to_the_log(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    f = tmp_path / "tcp_notsent_lowat"
    f.write_text("4294967295\n")
    with caplog.at_level(logging.INFO, logger="loraflight.swarm"):
        assert log_send_queue_note(f) is not None
        f.write_text(f"{SEND_QUEUE_BYTES}\n")
        assert log_send_queue_note(f) is None
    notes = [r for r in caplog.records if "tcp_notsent_lowat" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO


def test_deploy_sets_the_value_the_node_recommends() -> None:
    conf = (DEPLOY / "sysctl.d" / "60-loraflight.conf").read_text()
    lines = [ln for ln in conf.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines == [f"net.ipv4.tcp_notsent_lowat = {SEND_QUEUE_BYTES}"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["x-node"]["sysctls"] == {"net.ipv4.tcp_notsent_lowat": SEND_QUEUE_BYTES}
    unit = (DEPLOY / "loraflight.service").read_text()
    assert "install -Dm644 deploy/sysctl.d/60-loraflight.conf /etc/sysctl.d/60-loraflight.conf" in unit
    k8s = (DEPLOY / "k8s" / "loraflight.yaml").read_text()
    assert f'{{name: net.ipv4.tcp_notsent_lowat, value: "{SEND_QUEUE_BYTES}"}}' in k8s
