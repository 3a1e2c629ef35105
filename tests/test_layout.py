"""
The package's shape: the module graph of C{dheera_tx} has no import cycles,
its subpackages depend on each other in one direction only, and no module
grows past what a reader takes in at one sitting.
"""

import ast
import os
from typing import Dict, List, Set

from twisted.trial.unittest import SynchronousTestCase

import dheera_tx

PACKAGE_DIR = os.path.dirname(dheera_tx.__file__)
#: The most lines a module may have (the house style says "about 500").
MAX_LINES = 550


def _modules() -> Dict[str, str]:
    """
    :return: dotted module name -> file path, for every module of the
        package.
    """
    found = {}
    root = os.path.dirname(PACKAGE_DIR)
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
                if dotted.endswith(".__init__"):
                    dotted = dotted[: -len(".__init__")]
                found[dotted] = path
    return found


def _imports(path: str, modules: Set[str]) -> Set[str]:
    """
    :return: the package modules that the module at C{path} imports at any
        level (a function-level import is a dependency too).
    """
    tree = ast.parse(open(path, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                imported.add(name)
    return imported


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """
    :return: one cycle of C{graph} as a list of nodes, or an empty list.
    """
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for after in sorted(graph.get(node, ())):
            if state.get(after) == 1:
                return stack[stack.index(after):] + [after]
            if after not in state:
                found = visit(after)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _group(module: str) -> str:
    """
    :return: the subpackage a module belongs to (C{dheera_tx.http}, ...), or
        C{dheera_tx} for a top-level module.
    """
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


class LayoutTests(SynchronousTestCase):
    """
    The package layout stays as C{docs/design.md} describes it.
    """

    def setUp(self):
        self.modules = _modules()
        names = set(self.modules)
        self.graph = {
            module: {m for m in _imports(path, names) if m != module and m != "dheera_tx"}
            for module, path in self.modules.items()
        }

    def test_no_module_cycles(self):
        """
        No module imports, directly or through others, a module that
        imports it back.
        """
        self.assertEqual(_cycle(self.graph), [])

    def test_no_subpackage_cycles(self):
        """
        Between subpackages, dependencies run one way: if C{http} uses
        C{accounting}, nothing in C{accounting} uses C{http}.  Top-level
        modules (C{config}, C{errors}, C{call}, the assembly in C{tap}) are
        left out: they are the roots and the shared vocabulary.
        """
        groups: Dict[str, Set[str]] = {}
        for module, imported in self.graph.items():
            source = _group(module)
            if source == "dheera_tx":
                continue
            for target in imported:
                destination = _group(target)
                if destination not in ("dheera_tx", source):
                    groups.setdefault(source, set()).add(destination)
        self.assertEqual(_cycle(groups), [])

    def test_modules_stay_readable(self):
        """
        Every module has at most C{MAX_LINES} lines.
        """
        long = {}
        for module, path in self.modules.items():
            with open(path, encoding="utf-8") as f:
                lines = sum(1 for _ in f)
            if lines > MAX_LINES:
                long[module] = lines
        self.assertEqual(long, {})

    def test_cycle_finder_finds_cycles(self):
        """
        The cycle finder itself reports a cycle when there is one, so the
        tests above cannot pass by accident.
        """
        self.assertEqual(_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
        self.assertEqual(_cycle({"a": {"b"}, "b": set()}), [])
