"""One asyncio event loop per worker process, shared by every async handler that process runs.

The loop lives in a daemon thread, so the same code serves prefork children (one task at a time)
and the threads pool (many at once): callers hand it a coroutine and wait for the result, with a
timeout that cancels the coroutine instead of leaking it. A loop per task would throw away
connection pools and cost a loop start-up on every action.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid: int | None = None
_running: dict[str, concurrent.futures.Future] = {}


def get_loop() -> asyncio.AbstractEventLoop:
    """The process's loop, started on first use (and again in a forked child)."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or not _loop.is_running():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def _run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=_run, name="rekku-event-loop", daemon=True).start()
            started.wait()
            _loop, _pid = loop, os.getpid()
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None, key: str | None = None) -> T:
    """Run ``coro`` on the process loop and wait; on timeout or interruption the coroutine is cancelled.

    With ``key``, :func:`cancel` can stop it from another thread (raising CancelledError here)."""
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    if key is not None:
        _running[key] = future
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        if future.done():
            raise  # the coroutine's own TimeoutError
        future.cancel()
        raise TimeoutError(f"did not finish within {timeout:g} s") from None
    except BaseException:
        future.cancel()  # soft time limit, revoke or shutdown: stop the coroutine too
        raise
    finally:
        if key is not None:
            _running.pop(key, None)


def cancel(key: str) -> bool:
    """Cancel the coroutine started with ``key`` in this process; False if none is running."""
    future = _running.get(key)
    return bool(future and future.cancel())
