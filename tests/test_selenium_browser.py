"""The selenium pool's browser per process (plugins/selenium_elevenlabs/browser.py), with real headless Chromium."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rekku_plugins.selenium_elevenlabs.browser import BrowserHolder, PageError, _kill_tree
from rekku_plugins.selenium_elevenlabs.settings import SeleniumElevenLabsSettings


def _holder(**options: object) -> BrowserHolder:
    return BrowserHolder(SeleniumElevenLabsSettings(_env_file=None, **options))


def test_the_browser_starts_lazily_and_is_recycled_after_max_actions(tts_site: object) -> None:
    holder = _holder(max_actions=2)
    assert holder.starts == 0  # nothing runs until the first browser action
    sessions, roots = [], []
    try:
        for _ in range(3):
            with holder.session() as browser:
                browser.driver.get(tts_site.url + "/login")
                sessions.append(browser.driver.session_id)
                roots.append(browser.root)
        assert sessions[0] == sessions[1] != sessions[2] and holder.starts == 2
        assert not roots[0].exists() and roots[2].exists()  # a recycled browser's profile is removed
    finally:
        holder.discard()
    assert not roots[2].exists()


def test_a_crashed_browser_is_replaced_before_the_next_action() -> None:
    holder = _holder()
    try:
        with holder.session() as browser:
            first = browser.driver.session_id
            chromedriver = browser.driver.service.process.pid
        _kill_tree(chromedriver)
        with holder.session() as browser:
            assert browser.driver.session_id != first
            assert browser.driver.execute_script("return 1 + 1") == 2
        assert holder.starts == 2
    finally:
        holder.discard()


def test_a_page_error_keeps_the_browser_and_anything_else_discards_it() -> None:
    holder = _holder()
    try:
        with pytest.raises(PageError), holder.session():
            raise PageError("wrong password")
        kept = holder._browser
        assert kept is not None
        with pytest.raises(TimeoutError), holder.session():
            raise TimeoutError("time limit")
        assert holder._browser is None and not kept.root.exists()
    finally:
        holder.discard()


def test_chromium_runs_headless_with_background_networking_off() -> None:
    holder = _holder()
    try:
        with holder.session() as browser:
            pid = browser.driver.service.process.pid
            browser_args = _descendant_cmdlines(pid)
            assert any("--headless=new" in a and "--disable-background-networking" in a and "--no-sandbox" in a
                       and f"--user-data-dir={browser.root / 'profile'}" in a for a in browser_args), browser_args
    finally:
        holder.discard()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # chromedriver is gone


def _descendant_cmdlines(pid: int) -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, ValueError, IndexError):
                continue
    return out
