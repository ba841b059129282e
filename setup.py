"""Which packages the distribution installs, and under which names (the rest is pyproject.toml).

The folders keep the names that tell a newcomer where things live (rekku/, workers/, plugins/), but
``workers`` and ``plugins`` are names other code in the same environment uses too, so they install
as ``rekku_workers`` and ``rekku_plugins``: nothing but ``rekku*`` is put at the top of site-packages.
pyproject.toml cannot rename a folder while finding its subpackages, hence this file.
"""

from setuptools import find_namespace_packages, setup

RENAMED = {"rekku_workers": "workers", "rekku_plugins": "plugins"}

packages = find_namespace_packages(include=["rekku", "rekku.*"])
for name, folder in RENAMED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"])]

setup(packages=packages, package_dir={"rekku": "rekku", **RENAMED})
