"""The submit route's executor (rekku/api.py) works in a process forked after it was used."""

from __future__ import annotations

import asyncio
import multiprocessing
import os


def _child(conn) -> None:  # noqa: ANN001 - a multiprocessing connection
    from rekku import api

    try:
        conn.send(asyncio.run(asyncio.wait_for(api._in_thread(os.getpid), 5)))
    except BaseException as exc:  # the child reports, the test judges
        conn.send(repr(exc))


def test_a_process_forked_after_submits_still_runs_its_own() -> None:
    from rekku import api

    async def busy() -> list[int]:  # several at once: the executor has idle threads when the fork comes
        return list(await asyncio.gather(*(api._in_thread(os.getpid) for _ in range(4))))

    assert asyncio.run(busy()) == [os.getpid()] * 4
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(child,))
    proc.start()
    try:
        assert parent.poll(20), "the forked child did not answer"
        answer = parent.recv()
    finally:
        proc.join(10)
    assert answer == proc.pid, f"the forked child's submit did not run: {answer}"
