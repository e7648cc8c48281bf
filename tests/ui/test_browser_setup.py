"""Where Chromium cannot be installed, the console tests fail saying why (they never
skip): the set-up's answers, with the machine's tools replaced by stand-ins."""

from __future__ import annotations

import subprocess

import pytest
import uikit


def no_chromium(monkeypatch, apt: bool = True, root: bool = True) -> None:
    monkeypatch.setattr(uikit.shutil, "which", lambda name: "/usr/bin/apt-get" if apt and name == "apt-get" else None)
    monkeypatch.setattr(uikit.os, "geteuid", lambda: 0 if root else 1000)


def test_not_root(monkeypatch):
    no_chromium(monkeypatch, root=False)
    with pytest.raises(RuntimeError, match="not running as root.*apt-get install -y chromium"):
        uikit.find_or_install_chromium()


def test_no_apt(monkeypatch):
    no_chromium(monkeypatch, apt=False)
    with pytest.raises(RuntimeError, match="no apt-get"):
        uikit.find_or_install_chromium()


def test_apt_fails(monkeypatch):
    no_chromium(monkeypatch)
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        code = 100 if "install" in command else 0
        return subprocess.CompletedProcess(command, code, "", "E: Unable to locate package chromium")

    monkeypatch.setattr(uikit.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="(?s)failed \\(exit 100\\).*Unable to locate package chromium"):
        uikit.find_or_install_chromium()
    assert [c[-1] for c in calls] == ["-q", "chromium"] and "update" in calls[0]
