"""The kiosk-operator command line (no cluster needed for these)."""

from __future__ import annotations

import subprocess
import sys

from kiosk_operator.__main__ import own_namespace, parser


def test_no_namespace_is_a_one_line_error(monkeypatch):
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    proc = subprocess.run([sys.executable, "-m", "kiosk_operator"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--namespace" in proc.stderr


def test_options():
    args = parser().parse_args(["-n", "a", "-n", "b", "--metrics-port", "0", "--log-json"])
    assert args.namespace == ["a", "b"] and args.metrics_port == 0 and args.log_json
    assert parser().parse_args(["--all-namespaces"]).all_namespaces


def test_own_namespace_from_env(monkeypatch):
    monkeypatch.setenv("POD_NAMESPACE", "kiosk")
    assert own_namespace() == "kiosk"
