"""The import rules: plugins reach the core only through rekku.plugin, and the core never imports plugins.

The rules are import-linter contracts in pyproject.toml (``[tool.importlinter]``), checked here with
the ``lint-imports`` the dev extra installs, so CI enforces them. import-linter sees the bundled
``plugins/`` package; plugin folders that are not packages (tests/plugins, bench/plugins, a
REKKU_PLUGIN_PATH folder) are checked by reading their imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.contracts.forbidden import ForbiddenContract

ROOT = Path(__file__).resolve().parent.parent
#: Every folder of plugins in this repository: the bundled ones, the tests' and the benchmarks'.
PLUGIN_DIRS = [ROOT / "plugins", ROOT / "tests" / "plugins", ROOT / "bench" / "plugins"]
#: The contract's name in pyproject.toml.
PLUGIN_RULE = "Plugins import from rekku only through rekku.plugin"


def test_the_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache", "--no-logo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _core_imports(path: Path) -> list[str]:
    """``file:line module`` for every import of a rekku module other than rekku.plugin in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {m}" for m in modules
                  if (m == "rekku" or m.startswith("rekku.")) and m != "rekku.plugin"]
    return found


@pytest.mark.parametrize("folder", PLUGIN_DIRS, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_nothing_of_the_core_but_rekku_plugin(folder: Path) -> None:
    offending = [line for path in sorted(folder.rglob("*.py")) for line in _core_imports(path)]
    assert offending == [], "import these names from rekku.plugin instead:\n" + "\n".join(offending)


def _kept(rule: str, contract_class: type, *extra: tuple[str, str]) -> bool:
    """Whether the contract named ``rule`` in pyproject.toml holds on today's import graph plus the
    ``extra`` (importer, imported) edges: the way to show a contract is not vacuous."""
    config = read_configuration(str(ROOT / "pyproject.toml"))
    session = config["session_options"]
    options = next(c for c in config["contracts_options"] if c["name"] == rule)
    exclude = str(session.get("exclude_type_checking_imports", False)).lower() == "true"  # read as text
    graph = grimp.build_graph(*session["root_packages"], cache_dir=None, exclude_type_checking_imports=exclude)
    for importer, imported in extra:
        graph.add_import(importer=importer, imported=imported, line_number=1,
                         line_contents=f"from {imported} import something")
    contract = contract_class(name=rule, session_options=session,
                              contract_options={k: v for k, v in options.items() if k not in ("name", "type", "id")})
    return contract.check(graph, verbose=False).kept


def test_a_plugin_importing_a_core_module_breaks_the_contract() -> None:
    """The contract is not vacuous: one direct import of a core module by a plugin breaks it, and so
    does the package root (``from rekku import ...``)."""
    assert _kept(PLUGIN_RULE, ForbiddenContract)
    assert not _kept(PLUGIN_RULE, ForbiddenContract, ("rekku_plugins.echo", "rekku.db"))
    assert not _kept(PLUGIN_RULE, ForbiddenContract, ("rekku_plugins.echo", "rekku"))


#: The no-cycles contract's name in pyproject.toml.
CYCLE_RULE = "No import cycles among the modules of rekku, rekku.interfaces, workers, or the plugins"


def test_a_cycle_between_core_modules_breaks_the_contract() -> None:
    """The no-cycles contract is not vacuous: the cycle the Celery app used to close (it registered the
    tasks, so it imported the ingress's modules, which publish through dispatch, which imports the app)
    breaks it if it comes back, and so does one between two interface modules."""
    from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract

    assert _kept(CYCLE_RULE, AcyclicSiblingsContract)
    assert not _kept(CYCLE_RULE, AcyclicSiblingsContract, ("rekku.celery_app", "rekku.ingest"))
    assert not _kept(CYCLE_RULE, AcyclicSiblingsContract, ("rekku.interfaces.base", "rekku.interfaces.telegram"))


#: The layering contract's name in pyproject.toml.
LAYER_RULE = "The core never imports the worker side"


def test_a_core_module_importing_the_worker_side_breaks_the_contract() -> None:
    """The layering contract is not vacuous: the edge the CLI used to have (it read the pool definitions
    from the workers package) breaks it if it comes back."""
    assert _kept(LAYER_RULE, ForbiddenContract)
    assert not _kept(LAYER_RULE, ForbiddenContract, ("rekku.cli", "rekku_workers.runner"))
