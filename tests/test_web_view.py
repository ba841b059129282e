"""The read-only web view (/ui, rekku/web/ and rekku/view_api.py) in real headless Chromium against a real
stack: the page loads, login works and a wrong token is refused, filters narrow the list, pages follow the
cursor, the detail shows the payload redacted, the chart has data after traffic, and a payload holding
markup is shown as text with no script run."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import Stack, wait_until

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

#: The markup an attacker (or a confused model) puts in a payload: an image whose error handler runs,
#: and the end of a script block followed by a script of its own.
XSS_TEXT = '<img src=x onerror="window.__xss=1">'
XSS_NOTE = "</script><script>window.__xss=2</script><b id=injected>bold</b>"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from rekku_plugins.selenium_elevenlabs.browser import CHROMIUM_FLAGS
    from selenium import webdriver

    profile = Path(tempfile.mkdtemp(prefix="rekku-web-view-"))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    options.add_argument("--headless=new")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _by_id(driver: object, element_id: str) -> object:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _visible(driver: object, element_id: str) -> bool:
    """Read in the page in one go (the script replaces elements while a test waits)."""
    return driver.execute_script("const e = document.getElementById(arguments[0]);"
                                 "return !!e && e.offsetParent !== null && !e.closest('[hidden]')", element_id)


def _text(driver: object, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).innerText", element_id)


def _rows(driver: object) -> list[str]:
    """The ids of the list's rows, in order."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#actions tbody tr[data-id]')].map(tr => tr.dataset.id)")


def _open(driver: object, stack: Stack, token: str | None = None) -> None:
    """Load the page and log in with ``token`` (the stack's own by default)."""
    driver.get(stack.base_url + "/ui")
    driver.execute_script("sessionStorage.clear()")
    driver.get(stack.base_url + "/ui")
    wait_until(lambda: _visible(driver, "login-form"), what="the login form")
    _by_id(driver, "token").send_keys(token or stack.token)
    _by_id(driver, "login-button").click()


def _logged_in(driver: object, stack: Stack) -> None:
    _open(driver, stack)
    wait_until(lambda: _visible(driver, "main"), what="the logged-in view")


def _filter(driver: object, **fields: str) -> None:
    from selenium.webdriver.support.select import Select

    _by_id(driver, "clear-filters").click()
    for name, value in fields.items():
        if name == "status":
            Select(_by_id(driver, "f-status")).select_by_value(value)
        else:
            _by_id(driver, {"type": "f-type", "chat_id": "f-chat", "batch_id": "f-batch"}[name]).send_keys(value)
    _by_id(driver, "apply-filters").click()


def test_the_page_is_public_static_content_under_a_strict_policy(stack: Stack) -> None:
    page = requests.get(stack.base_url + "/ui", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy and "form-action 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<script src="/ui/app.js" defer></script>' in page.text and page.text.count("<script") == 1
    assert "<style" not in page.text and " style=" not in page.text and " on" + "click" not in page.text
    script = requests.get(stack.base_url + "/ui/app.js", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script.text, sink
    assert requests.get(stack.base_url + "/ui/app.css", timeout=10).headers["content-type"].startswith("text/css")
    for missing in ("/ui/nope.js", "/ui/..%2Fapi.py", "/ui/%2e%2e%2fview_api.py"):
        assert requests.get(stack.base_url + missing, timeout=10).status_code == 404, missing


def test_a_wrong_token_is_refused_and_the_right_one_logs_in(stack: Stack, browser: object) -> None:
    _open(browser, stack, token="not-the-token")
    wait_until(lambda: "Wrong token" in _text(browser, "login-error"), what="the wrong-token error")
    assert not _visible(browser, "main") and browser.execute_script("return sessionStorage.length") == 0
    _by_id(browser, "token").clear()
    _by_id(browser, "token").send_keys(stack.token)
    _by_id(browser, "login-button").click()
    wait_until(lambda: _visible(browser, "main"), what="the logged-in view")
    assert _text(browser, "login-error") == "" and not _visible(browser, "login")
    assert browser.execute_script("return sessionStorage.getItem('rekku.apiToken')") == stack.token
    assert browser.execute_script("return document.cookie") == ""  # the token is in no cookie
    browser.refresh()  # the tab keeps the token: no new login
    wait_until(lambda: _visible(browser, "main") and _text(browser, "page-number") == "page 1",
               what="the list after a reload")
    _by_id(browser, "logout").click()
    wait_until(lambda: _visible(browser, "login-form"), what="the login form after logging out")
    assert browser.execute_script("return sessionStorage.length") == 0


def test_filters_narrow_the_list_and_pages_follow_the_cursor(stack: Stack, browser: object) -> None:
    chat = f"web-{uuid.uuid4().hex[:8]}"
    answer = stack.submit([{"type": "echo", "payload": {"text": "one"}}, {"type": "tk_fail", "payload": {}},
                           {"type": "echo", "payload": {"text": "two"}}], {"chat_id": chat})
    ids = [a["id"] for a in answer["accepted"]]
    for action_id in ids:
        stack.wait_action(action_id)
    many = stack.submit([{"type": "echo", "payload": {"text": str(i)}} for i in range(30)], {"chat_id": chat + "-many"})
    _logged_in(browser, stack)
    _filter(browser, chat_id=chat)
    wait_until(lambda: sorted(_rows(browser)) == sorted(ids), what="the chat's three actions")
    _filter(browser, chat_id=chat, status="failed")
    wait_until(lambda: _rows(browser) == [ids[1]], what="the failed one")
    _filter(browser, type="tk_fail", batch_id=answer["batch_id"])
    wait_until(lambda: _rows(browser) == [ids[1]], what="the batch's tk_fail")
    _filter(browser, batch_id=answer["batch_id"], status="succeeded")
    wait_until(lambda: sorted(_rows(browser)) == sorted([ids[0], ids[2]]), what="the batch's echoes")

    every = {a["id"] for a in many["accepted"]}
    _filter(browser, chat_id=chat + "-many")
    wait_until(lambda: len(_rows(browser)) == 25, what="a first page of 25")
    first = _rows(browser)
    assert _text(browser, "page-number") == "page 1" and _by_id(browser, "newer-page").get_attribute("disabled")
    _by_id(browser, "older-page").click()
    wait_until(lambda: len(_rows(browser)) == 5, what="the last 5")
    second = _rows(browser)
    assert set(first) | set(second) == every and not set(first) & set(second)
    assert _by_id(browser, "older-page").get_attribute("disabled")
    _by_id(browser, "newer-page").click()
    wait_until(lambda: _rows(browser) == first, what="the first page again")


def test_the_detail_shows_the_payload_redacted_and_markup_as_text(stack: Stack, browser: object) -> None:
    from selenium.webdriver.common.by import By

    chat = f"web-{uuid.uuid4().hex[:8]}"
    payload = {"text": XSS_TEXT, "data": {"note": XSS_NOTE, "password": "hunter2-web", "access_token": "tok-web"}}
    run = stack.run("echo", payload, {"chat_id": chat})
    failed = stack.run("tk_fail", {"message": XSS_NOTE}, {"chat_id": chat})
    _logged_in(browser, stack)
    _filter(browser, chat_id=chat)
    wait_until(lambda: sorted(_rows(browser)) == sorted([run["id"], failed["id"]]), what="the chat's actions")
    browser.find_element(By.CSS_SELECTOR, f'#actions tr[data-id="{run["id"]}"] button').click()
    wait_until(lambda: _visible(browser, "detail") and _text(browser, "detail-id") == run["id"],
               what="the action's detail")
    shown = _by_id(browser, "detail-payload").text
    assert '"password": "***"' in shown and '"access_token": "***"' in shown
    assert "hunter2-web" not in browser.page_source and "tok-web" not in browser.page_source
    assert XSS_TEXT.replace('"', '\\"') in shown and XSS_NOTE in shown  # the markup itself, as text
    assert XSS_NOTE in _by_id(browser, "detail-result").text
    fields = _by_id(browser, "detail-fields").text
    for expected in ("succeeded", "echo", "default", f"default@{stack.name}-main", run["batch_id"], "ran (started"):
        assert expected in fields, expected
    browser.find_element(By.CSS_SELECTOR, f'#actions tr[data-id="{failed["id"]}"] button').click()
    wait_until(lambda: _text(browser, "detail-id") == failed["id"], what="the failed action's detail")
    assert XSS_NOTE in _by_id(browser, "detail-error").text
    # nothing of it became markup, and no script of it ran
    assert browser.find_elements(By.CSS_SELECTOR, "#main img, #main script, #injected") == []
    assert browser.execute_script("return window.__xss") is None


def test_the_chart_queues_and_workers_show_data_after_traffic(stack: Stack, browser: object) -> None:
    from selenium.webdriver.common.by import By

    answer = stack.submit([{"type": "echo", "payload": {"text": str(i)}} for i in range(8)],
                          {"chat_id": f"web-{uuid.uuid4().hex[:8]}"})
    for a in answer["accepted"]:
        stack.wait_action(a["id"])
    browser.get_log("browser")  # what earlier tests left (a refused token's 401 is logged on purpose)
    _logged_in(browser, stack)

    def charted() -> int:
        _by_id(browser, "refresh").click()
        counts = browser.execute_script(
            "return [...document.querySelectorAll('#chart rect.bar')].map(b => Number(b.dataset.count))")
        return sum(counts) if len(counts) == 60 else 0

    assert wait_until(lambda: charted() >= 8, what="the chart's bars")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart polyline.p50")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart polyline.p99")
    assert "actions finished" in _by_id(browser, "latency-summary").text
    queues = _by_id(browser, "queues").text
    assert all(pool in queues for pool in ("default", "io", "selenium", "terminal"))
    assert f"default@{stack.name}-main" in _by_id(browser, "workers").text
    # the page ran under its own policy without a violation (and without any other error)
    problems = [e["message"] for e in browser.get_log("browser")
                if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
    assert problems == []
