"""The model loop's task, ``rekku.model.turn`` (rekku/model_loop.py says what a turn does and how turns
of a chat are coalesced). Imported by rekku_workers.tasks only when REKKU_LLM_URL is set."""

from __future__ import annotations

from celery import Celery, Task

from rekku import model_loop
from rekku.turns import TURN_QUEUE, TURN_TASK


def register_model_turn(app: Celery) -> None:
    if TURN_TASK in app.tasks:
        return

    def model_turn(self: Task, interface: str, chat_id: str, thread_id: str = "", failures: int = 0) -> None:
        """One turn of the model for a chat: read what is new on its feed, ask the model, run the reply."""
        outcome = model_loop.run(interface, chat_id, thread_id, failures)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in, max_retries=None,
                             kwargs={"interface": interface, "chat_id": chat_id, "thread_id": thread_id,
                                     "failures": outcome.failures})

    app.task(model_turn, bind=True, name=TURN_TASK, queue=TURN_QUEUE, acks_late=True, ignore_result=True,
             max_retries=None)
    app.conf.task_routes = {**(app.conf.task_routes or {}), TURN_TASK: {"queue": TURN_QUEUE}}
