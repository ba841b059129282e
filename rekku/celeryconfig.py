"""Celery settings for every Rekku process, all taken from the one settings object (docs/contracts.md §6).

Users who know Celery find the usual names here; ``celery -A rekku.celery_app worker -Q selenium``
reads this module too. (The file celeryconfig.py at the top of a checkout only points here.)
"""

from rekku.broker import transport_options
from rekku.settings import get_settings

_settings = get_settings()

broker_url = _settings.resolved_broker_url()
#: The answer of `rekku.ingest` and progress states travel through the result backend; action
#: results themselves live in the action log.
result_backend = broker_url
result_expires = 24 * 3600

# JSON only: a pickled message is refused, never executed.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"
if _settings.signing_enabled:
    # Optional signing: task and control messages are JSON signed with this node's key, and only
    # messages signed by a certificate in the store are accepted (rekku.celery_app calls
    # setup_security). Results and events stay plain JSON: they are never executed.
    task_serializer = "auth"
    accept_content = ["auth"]
    security_key = str(_settings.signing_key)
    security_certificate = str(_settings.signing_cert)
    security_cert_store = _settings.signing_cert_store
    security_digest = "sha256"

# Nothing lost: acknowledge after the run, and put the message back if the worker dies mid-run.
task_acks_late = True
task_reject_on_worker_lost = True
# A run that failed or timed out is final (recorded in the action log): acknowledge it. Celery's default
# too, said with the two settings that replace the deprecated task_acks_on_failure_or_timeout.
task_acks_on_failure = True
task_acks_on_timeout = True
worker_prefetch_multiplier = 1
# A sentinel:// broker URL (a Redis Sentinel group) also needs the master's name, for the broker and
# the result backend alike (rekku/broker.py; an empty dict for a plain Redis).
broker_transport_options = {"visibility_timeout": _settings.visibility_timeout, **transport_options(_settings)}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout,
                                    **transport_options(_settings)}
broker_connection_retry_on_startup = True

# Flower sees every task.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

task_default_queue = "default"
task_create_missing_queues = True
timezone = "UTC"
enable_utc = True
worker_hijack_root_logger = False
beat_schedule: dict = {}
