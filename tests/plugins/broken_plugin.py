"""A plugin file that fails to import: discovery must report it and load the others."""

import this_module_does_not_exist  # noqa: F401

PLUGIN_CLASS = object
