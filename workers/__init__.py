"""What a worker (or beat) process runs: the tasks it registers, the runner and its hooks, the event
loop, the bootsteps of a node's lifetime. The core (``rekku``) never imports this package; it publishes
by task name (docs/architecture.md)."""
