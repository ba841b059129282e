"""Benchmarks of Rekku against bare Celery, measured in the same run: ``python -m bench``.

See ``bench/README.md`` for what is measured and why only ratios are judged.
"""
