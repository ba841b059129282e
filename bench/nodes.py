"""``python -m bench.nodes``: drain rate and CPU per action with 1, 2 and 4 worker nodes.

Each node is a separate ``rekku worker --pool default`` process with its own node name, started as it
would be on a machine of its own (here all on this one). For each node count: the nodes stop consuming,
``--actions`` echo actions are queued through the ingress, the nodes start consuming together and the
clock runs until the last one is ``succeeded`` in the action log (its ``finished_at``). Reported per node
count: actions drained per second, and CPU milliseconds per action of the worker processes, of Redis
(``INFO cpu``) and of the MariaDB server (``/proc`` of ``mariadbd``, when the action log is there).

On a 2-core machine more nodes cannot drain faster once the cores are busy; what matters is that the
CPU an action costs does not grow with the number of nodes (no contention between nodes in Redis or
the database). Figures in ``bench/results/nodes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from bench.scenarios import BATCH, Ingress
from bench.stack import DEFAULT_BROKER_URL, POOL, Stack, tree_cpu, wait_until
from rekku.db import make_engine
from rekku.models import SUCCEEDED, ActionRun

RESULTS = Path(__file__).resolve().parent / "results" / "nodes.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.nodes", description=__doc__.splitlines()[0])
    p.add_argument("--actions", type=int, default=3000, help="actions per node count, a multiple of 100")
    p.add_argument("--nodes", default="1,2,4", help="node counts (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=1, help="pool processes per node (default %(default)s)")
    p.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    p.add_argument("--database-url", default="mariadb", help="as for python -m bench (default: mariadb)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.actions <= 0 or args.actions % BATCH:
        p.error(f"--actions must be a positive multiple of {BATCH}")
    return args


def mariadb_cpu() -> float:
    """CPU seconds of the MariaDB server on this machine (0 when there is none)."""
    try:
        pids = subprocess.run(["pidof", "mariadbd"], capture_output=True, text=True).stdout.split()
    except OSError:
        return 0.0
    return sum(tree_cpu(int(pid)) for pid in pids)


def redis_cpu(stack: Stack) -> float:
    info = stack.redis().info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def consume(nodes: list[str], on: bool) -> None:
    """Switch the nodes' consumers of the pool's queue on or off, and wait until all say so."""
    from bench.bare_app import app

    command = app.control.add_consumer if on else app.control.cancel_consumer
    command(POOL, destination=nodes, reply=True, timeout=5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        replies = app.control.inspect(destination=nodes, timeout=2).active_queues() or {}
        if all((POOL in {q["name"] for q in replies.get(n, [])}) == on for n in nodes):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the nodes did not {'start' if on else 'stop'} consuming")


def drain(stack: Stack, engine: sa.Engine, client: Ingress, n_nodes: int, actions: int, concurrency: int,
          done_before: int) -> dict:
    names = [f"n{n_nodes}x{k}" for k in range(n_nodes)]
    procs = [stack.spawn_worker(f"worker-{name}", name, concurrency) for name in names]
    nodes = [f"{POOL}@{name}" for name in names]
    try:
        for node, proc, name in zip(nodes, procs, names):
            wait_until(lambda n=node: stack.ping(n), 90, f"{node} to answer ping", interval=0.3, alive=proc,
                       log=stack.logs / f"worker-{name}.log")
        consume(nodes, on=False)
        body = json.dumps({"actions": [{"type": "echo", "payload": {}}] * BATCH}).encode()
        for _ in range(actions // BATCH):
            client.post_actions(body)
        cpu = {"workers": sum(tree_cpu(p.pid) for p in procs), "redis": redis_cpu(stack), "mariadb": mariadb_cpu()}
        start = time.time()
        consume(nodes, on=True)
        wait_until(lambda: _succeeded(engine) >= done_before + actions, max(120.0, actions / 5),
                   f"{actions} actions drained by {n_nodes} nodes", interval=0.05)
        with engine.connect() as conn:
            end = conn.scalar(sa.select(sa.func.max(ActionRun.finished_at)))
        used = {"workers": sum(tree_cpu(p.pid) for p in procs) - cpu["workers"],
                "redis": redis_cpu(stack) - cpu["redis"], "mariadb": mariadb_cpu() - cpu["mariadb"]}
        seconds = end.timestamp() - start
        return {"nodes": n_nodes, "seconds": seconds, "per_second": actions / seconds,
                "cpu_ms_per_action": {k: 1000 * v / actions for k, v in used.items()}}
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def _succeeded(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(ActionRun).where(ActionRun.status == SUCCEEDED))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack = Stack(args.broker_url, None if args.database_url == "sqlite" else args.database_url, args.concurrency)
    rows = []
    try:
        stack.start(workers=False)
        engine = make_engine(stack.db.url)
        client = Ingress(stack.port, stack.token)
        done = 0
        for n in (int(x) for x in args.nodes.split(",")):
            print(f"{n} node(s): queueing {args.actions:,} actions, then draining …", flush=True)
            rows.append(drain(stack, engine, client, n, args.actions, args.concurrency, done))
            done += args.actions
            r = rows[-1]
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_action"].items())
            print(f"  {r['per_second']:,.0f} actions/s; CPU ms per action: {cpu}", flush=True)
    except BaseException:
        stack.failed = True
        raise
    finally:
        stack.stop()
    first = rows[0]["cpu_ms_per_action"]
    for r in rows:
        total, base = sum(r["cpu_ms_per_action"].values()), sum(first.values())
        r["cpu_per_action_vs_one_node"] = total / base if base else None
    result = {"actions": args.actions, "concurrency_per_node": args.concurrency,
              "database": args.database_url, "cpus": os.cpu_count(), "load": os.getloadavg(), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print("nodes | actions/s | CPU ms/action (workers + Redis + MariaDB) | vs 1 node")
    for r in rows:
        print(f"{r['nodes']:>5} | {r['per_second']:>9,.0f} | {sum(r['cpu_ms_per_action'].values()):>10.2f} | "
              f"{r['cpu_per_action_vs_one_node']:.2f}")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
