"""Rekku's bundled plugins, installed as ``rekku_plugins`` (setup.py says why). The core finds them at run
time (rekku.registry) and never imports them; each plugin imports only the plugin API, ``rekku.plugin``."""
