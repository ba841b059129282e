"""One asyncio event loop per worker process, shared by every async handler that process runs.

A prefork child runs one task at a time in its main thread, so there the loop runs in that thread
(``run_until_complete``): no thread hand-off on the hot path. The threads pool runs many tasks at
once in other threads, so there the loop lives in a daemon thread and callers wait on a future.
Either way a process has one loop, connection pools survive between actions, and a time limit,
cancel or soft time limit cancels the coroutine instead of leaking it. A loop per task would throw
away connection pools and cost a loop start-up on every action.
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
_running: dict[str, concurrent.futures.Future | asyncio.Task] = {}


class _Expired(Exception):
    """Our own time limit, told apart from a TimeoutError the coroutine raises itself."""


def get_loop() -> asyncio.AbstractEventLoop:
    """The process's loop (created on first use, and again in a forked child)."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or _loop.is_closed():
            _loop, _pid = asyncio.new_event_loop(), os.getpid()
        return _loop


def _ensure_thread(loop: asyncio.AbstractEventLoop) -> None:
    with _lock:
        if loop.is_running():
            return
        started = threading.Event()

        def _serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        threading.Thread(target=_serve, name="rekku-event-loop", daemon=True).start()
    started.wait()


async def _limited(coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
    if timeout is None:
        return await coro
    try:
        async with asyncio.timeout(timeout) as scope:
            return await coro
    except TimeoutError:
        if scope.expired():
            raise _Expired() from None
        raise


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None, key: str | None = None) -> T:
    """Run ``coro`` on the process loop and wait for it.

    On timeout a ``TimeoutError("did not finish within N s")`` is raised; with ``key``,
    :func:`cancel` can stop it from another thread (``CancelledError`` here)."""
    loop = get_loop()
    try:
        if threading.current_thread() is threading.main_thread() and not loop.is_running():
            return _run_here(loop, coro, timeout, key)
        _ensure_thread(loop)
        return _run_there(loop, coro, timeout, key)
    except _Expired:
        raise TimeoutError(f"did not finish within {timeout:g} s") from None
    finally:
        if key is not None:
            _running.pop(key, None)


def _run_here(loop: asyncio.AbstractEventLoop, coro: Coroutine, timeout: float | None, key: str | None) -> Any:
    task = loop.create_task(_limited(coro, timeout))
    if key is not None:
        _running[key] = task
    try:
        return loop.run_until_complete(task)
    except BaseException:
        # A soft time limit or cancel signal interrupted the loop: stop the coroutine for real.
        if not task.done():
            task.cancel()
            try:
                loop.run_until_complete(asyncio.wait([task], timeout=5))
            except BaseException:
                pass
        raise


def _run_there(loop: asyncio.AbstractEventLoop, coro: Coroutine, timeout: float | None, key: str | None) -> Any:
    future = asyncio.run_coroutine_threadsafe(_limited(coro, timeout), loop)
    if key is not None:
        _running[key] = future
    try:
        return future.result()
    except BaseException:
        future.cancel()  # soft time limit, revoke or shutdown: stop the coroutine too
        raise


def cancel(key: str) -> bool:
    """Cancel the coroutine started with ``key`` in this process; False if none is running."""
    running = _running.get(key)
    if running is None:
        return False
    if isinstance(running, asyncio.Task):
        running.get_loop().call_soon_threadsafe(running.cancel)
        return True
    return running.cancel()
