"""One browser per selenium worker process: started lazily, reused, health-checked, recycled.

A browser action does ``with browser_session() as driver: ...``. The first one in a process starts
Chromium (never in the process-init hook, which Celery kills after 4 s); later ones reuse it after a
quick health check (a dead or wedged browser is replaced). After ``SELENIUM_MAX_ACTIONS`` actions the
browser is recycled, which bounds Chromium's memory growth. An action that fails for any reason
other than :class:`PageError` (a time limit on a hung page, a crash, a lost session) discards the
browser, so the next action starts from a clean one and the worker keeps serving.

Each browser gets a fresh profile and download directory under the system temp dir, removed with
it. ``SELENIUM_REMOTE_URL`` makes browsers ``webdriver.Remote`` sessions on a W3C WebDriver server
instead (a Selenium Grid, or chromedriver on a port), held, checked and replaced the same way. A
remote browser downloads on its own machine: through a Grid with managed downloads the files are
fetched over the protocol; otherwise they are read from our download directory, so a session whose
browser cannot open a file there (another machine, another user) is refused when it starts.

A local browser never outlives its worker process, however that process dies (a SIGKILLed worker
once left Chromium running). chromedriver and every Chromium process run in a process group of their
own (in the worker's session, so chromedriver may join it), led by a tiny watchdog (``sh``) that gets
a parent-death signal (PR_SET_PDEATHSIG) from the worker process and then SIGKILLs its whole group.
Each group is also recorded (``rekku-browsers-<uid>`` in the temp dir, with the owner's pid and the
profile directory); starting a browser first sweeps the groups whose owner is dead (a watchdog
killed along with its worker), checked by the profile directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from rekku.plugin import PluginError, TransientError, die_with_parent

from .settings import SeleniumElevenLabsSettings

log = logging.getLogger(__name__)

#: Chromium flags safe in containers and on machines without internet (no background traffic).
CHROMIUM_FLAGS = (
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
    "--window-size=1280,900",
)
#: Names of downloads still in progress.
PARTIAL = (".crdownload", ".tmp")
#: Seconds the health check and a quit may take before the browser is considered wedged.
HEALTH_TIMEOUT = 5.0


#: The watchdog leading each browser's process group: on its parent's death (SIGTERM through
#: PR_SET_PDEATHSIG), or any SIGTERM/SIGHUP/SIGINT, it SIGKILLs the group (chromedriver, Chromium, itself).
WATCHDOG = 'trap "kill -KILL 0" TERM HUP INT; while :; do sleep 86400 & wait $!; done'


def _records_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"rekku-browsers-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(entry.name))
    return members


def sweep_orphans() -> int:
    """SIGKILL the browser groups recorded by processes that are gone; returns how many were swept.
    A group is killed only while one of its processes still names the recorded profile directory."""
    swept = 0
    directory = _records_dir()
    for record in directory.glob("*.json") if directory.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(record.read_text())
            if _alive(int(data["owner"])):
                continue
            pgid, root = int(data["pgid"]), str(data["root"])
            for pid in _group_members(pgid):
                with contextlib.suppress(OSError):
                    if root.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.killpg(pgid, signal.SIGKILL)
                        log.warning("killed the browser left by dead worker process %s (group %s)",
                                    data["owner"], pgid)
                        swept += 1
                        break
            shutil.rmtree(root, ignore_errors=True)
            record.unlink(missing_ok=True)
    return swept


def _start_watchdog() -> subprocess.Popen:

    return subprocess.Popen(["/bin/sh", "-c", WATCHDOG], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, process_group=0, preexec_fn=die_with_parent)


class PageError(PluginError):
    """The page said no (wrong password, a missing element): the action fails, the browser is fine."""


class Browser:
    """One WebDriver session and its private directories."""

    def __init__(self, settings: SeleniumElevenLabsSettings) -> None:
        from selenium import webdriver

        self.root = Path(tempfile.mkdtemp(prefix=f"rekku-browser-{os.getpid()}-"))
        self.downloads = self.root / "downloads"
        self.downloads.mkdir()
        self.actions = 0
        self.started = time.monotonic()
        options = webdriver.ChromeOptions()
        options.page_load_strategy = "eager"  # DOM ready is enough: waits are on elements
        if settings.headless:
            options.add_argument("--headless=new")
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_experimental_option("prefs", {
            "download.default_directory": str(self.downloads), "download.prompt_for_download": False,
            "download.directory_upgrade": True, "safebrowsing.enabled": False})
        self.remote = bool(settings.remote_url)
        self.watchdog: subprocess.Popen | None = None
        self.record: Path | None = None
        #: Remote only: the server keeps downloads and hands them over (Selenium Grid's managed downloads).
        self.managed_downloads = False
        if self.remote:
            options.enable_downloads = True  # asks a Grid for managed downloads; a plain WebDriver ignores it
            self.driver = _remote_driver(settings, options)
            self.managed_downloads = bool(self.driver.capabilities.get("se:downloadsEnabled"))
            if not self.managed_downloads and not self._sees_downloads():
                self.close()
                raise PluginError(
                    f"the WebDriver server at {shown_url(settings.remote_url)} offers no managed downloads "
                    f"(se:downloadsEnabled) and its browser cannot read this worker's download directory: "
                    f"run it on the worker's machine, or use a Selenium Grid with downloads enabled")
        else:
            options.binary_location = settings.chromium_path
            options.add_argument(f"--user-data-dir={self.root / 'profile'}")
            sweep_orphans()
            self.watchdog = watchdog = _start_watchdog()
            self._remember(watchdog.pid)
            service = webdriver.ChromeService(executable_path=settings.chromedriver_path,
                                              log_output=str(self.root / "chromedriver.log"),
                                              popen_kw={"process_group": watchdog.pid})
            try:
                self.driver = webdriver.Chrome(service=service, options=options)
            except BaseException:
                self._kill_group()
                shutil.rmtree(self.root, ignore_errors=True)
                raise
            with contextlib.suppress(Exception):  # headless Chromium needs to be told where downloads go
                self.driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                                            {"behavior": "allow", "downloadPath": str(self.downloads)})
        self.driver.set_page_load_timeout(60)

    def _sees_downloads(self) -> bool:
        """The remote browser can open a file written to our download directory: it shares this machine's
        file system (a WebDriver server on the worker's host), so its downloads land where we read them."""
        token = secrets.token_hex(8)
        probe = self.downloads / "rekku-probe.txt"
        probe.write_text(token)
        try:
            self.driver.get(probe.as_uri())
            return token in self.driver.page_source
        except Exception:
            return False
        finally:
            probe.unlink(missing_ok=True)

    def _remember(self, pgid: int) -> None:
        directory = _records_dir()
        directory.mkdir(mode=0o700, exist_ok=True)
        self.record = directory / f"{pgid}.json"
        self.record.write_text(json.dumps({"owner": os.getpid(), "pgid": pgid, "root": str(self.root)}))

    def _kill_group(self) -> None:
        """SIGKILL the browser's process group (chromedriver, Chromium, the watchdog) and forget it."""
        if self.watchdog is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.watchdog.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.watchdog.wait(5)
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    def healthy(self) -> bool:
        """The browser answers a trivial script within HEALTH_TIMEOUT."""
        outcome: list[Any] = []

        def probe() -> None:
            try:
                outcome.append(self.driver.execute_script("return 1"))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(HEALTH_TIMEOUT)
        return outcome == [1]

    def clear_downloads(self) -> None:
        for item in self.downloads.iterdir():
            item.unlink(missing_ok=True) if not item.is_dir() else shutil.rmtree(item, ignore_errors=True)
        if self.managed_downloads:
            with contextlib.suppress(Exception):
                self.driver.delete_downloadable_files()

    def wait_for_download(self, suffix: str, timeout: float) -> Path | None:
        """The downloaded file ending in ``suffix`` once no partial download is left (fetched from the
        Grid node with managed downloads), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.managed_downloads:
                names = self.driver.get_downloadable_files()
                done = [n for n in names if n.lower().endswith(suffix)]
                if done and not any(n.endswith(PARTIAL) for n in names):
                    self.driver.download_file(done[-1], str(self.downloads))
                    return self.downloads / done[-1]
            else:
                files = list(self.downloads.iterdir())
                done = [f for f in files if f.name.lower().endswith(suffix)]
                if done and not any(f.name.endswith(PARTIAL) for f in files):
                    return max(done, key=lambda f: f.stat().st_mtime)
            time.sleep(0.05)
        return None

    def close(self) -> None:
        """Quit the session; a browser that does not quit in time is killed."""
        pid = None
        service = getattr(self.driver, "service", None)
        if service is not None and getattr(service, "process", None) is not None:
            pid = service.process.pid
        done = threading.Event()

        def quit_driver() -> None:
            with contextlib.suppress(Exception):
                self.driver.quit()
            done.set()

        threading.Thread(target=quit_driver, daemon=True).start()
        if not done.wait(HEALTH_TIMEOUT) and pid is not None:
            _kill_tree(pid)
        self._kill_group()  # whatever the quit left behind
        shutil.rmtree(self.root, ignore_errors=True)


def shown_url(url: str) -> str:
    """``url`` without the credentials a Grid URL may carry (``http://user:password@grid:4444``)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _remote_driver(settings: SeleniumElevenLabsSettings, options: Any) -> Any:
    """A session on the WebDriver server at ``SELENIUM_REMOTE_URL`` (credentials in the URL go in the
    Authorization header, never in a message). An unreachable server is a
    TransientError (the action is retried, then fails naming the server), never a hang: no request
    waits longer than the action's own time limit."""
    import urllib3
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.remote.client_config import ClientConfig

    raw = settings.remote_url or ""
    url, parts = shown_url(raw), urlsplit(raw)
    config = ClientConfig(remote_server_addr=url, timeout=settings.time_limit,
                          username=unquote(parts.username) if parts.username else None,
                          password=unquote(parts.password) if parts.password else None)
    try:
        return webdriver.Remote(command_executor=url, options=options, client_config=config)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TransientError(f"the WebDriver server at {url} is unreachable ({reason})") from None
    except WebDriverException as exc:
        raise PluginError(f"the WebDriver server at {url} did not start a browser: "
                          f"{(exc.msg or type(exc).__name__).strip()}") from None


def _kill_tree(pid: int) -> None:
    """SIGKILL chromedriver and every Chromium process it started (they are its descendants)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    todo, seen = [pid], []
    while todo:
        current = todo.pop()
        seen.append(current)
        todo += children.get(current, [])
    for victim in seen:
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)


class BrowserHolder:
    """The process's browser (one per prefork child; a forked child never uses its parent's)."""

    def __init__(self, settings: SeleniumElevenLabsSettings | None = None) -> None:
        self._settings = settings
        self._browser: Browser | None = None
        self._pid = os.getpid()
        self.starts = 0

    @property
    def settings(self) -> SeleniumElevenLabsSettings:
        return self._settings or SeleniumElevenLabsSettings.get()

    def acquire(self) -> Browser:
        """A healthy browser: the current one, or a new one."""
        if self._pid != os.getpid():  # inherited through fork: not ours to use or quit
            self._browser, self._pid = None, os.getpid()
        browser = self._browser
        limit = self.settings.max_actions
        if browser is not None and limit and browser.actions >= limit:
            log.info("recycling the browser after %s actions", browser.actions)
            self.discard()
        elif browser is not None and not browser.healthy():
            log.warning("the browser stopped answering; starting a new one")
            self.discard()
        if self._browser is None:
            self._browser = Browser(self.settings)
            self.starts += 1
            log.info("browser started (%s)", "remote" if self._browser.remote else "local Chromium")
        return self._browser

    def discard(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            browser.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[Browser]:
        """The browser for one action. A PageError keeps it; anything else (a time limit, a crash) discards it."""
        browser = self.acquire()
        browser.actions += 1
        browser.clear_downloads()
        try:
            yield browser
        except PageError:
            raise
        except BaseException:
            log.warning("discarding the browser after a failed action")
            self.discard()
            raise


_holder = BrowserHolder()


def browser_session() -> contextlib.AbstractContextManager[Browser]:
    """``with browser_session() as browser: browser.driver.get(...)`` — the process's browser."""
    return _holder.session()


def holder() -> BrowserHolder:
    return _holder


def _close_at_exit(**_kwargs: Any) -> None:
    if _holder._pid == os.getpid():
        _holder.discard()


def _register_shutdown() -> None:
    """Quit the browser when the pool process ends (billiard skips atexit in its children)."""
    import atexit

    from celery.signals import worker_process_shutdown

    atexit.register(_close_at_exit)
    worker_process_shutdown.connect(_close_at_exit, weak=False)


_register_shutdown()
