"""Celery's usual settings module name, kept at the top of a checkout so people who look for it find
where the settings are: ``rekku/celeryconfig.py`` (installed as ``rekku.celeryconfig``, which every
Rekku process loads). Only ``celery --config celeryconfig`` run from a checkout imports this file; it
is not installed, so it never shadows another project's ``celeryconfig``."""

from rekku.celeryconfig import *  # noqa: F401,F403
