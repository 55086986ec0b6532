"""The ``>>>`` examples in svftune's docstrings run, one test per docstring, and must print what they show.

They run here rather than through ``pytest --doctest-modules`` so that they use the installed ``svftune`` package
(the same module objects as every other test, whatever the import mode) and never collect tests/ or examples/.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import time

import pytest

import svftune

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: Longest an example may run, in seconds (they are documentation: a tiny model each).
TIME_LIMIT = 5.0

#: Entry points whose docstrings must show a runnable example.
WITH_EXAMPLES = [
    "apply_svf",
    "merge_svf",
    "unapply_svf",
    "trainable_parameters",
    "print_trainable_parameters",
    "freeze_batchnorm",
    "select_layers",
    "svf_layers",
    "thin_svd",
    "save_svf",
    "load_svf",
    "read_svf",
    "set_adapter",
    "mix_adapters",
    "disable_adapter",
    "DecompositionCache",
    "SVFConfig",
]


def _modules() -> list[object]:
    modules = [svftune]
    for info in pkgutil.iter_modules(svftune.__path__, "svftune."):
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError as err:  # a module needing a missing optional dependency (e.g. matplotlib)
            if err.name is None or err.name.split(".")[0] == "svftune":
                raise
    return modules


def _examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = [test for module in _modules() for test in finder.find(module, module.__name__) if test.examples]
    return sorted(tests, key=lambda test: test.name)


EXAMPLES = _examples()


@pytest.mark.parametrize("example", EXAMPLES, ids=[test.name for test in EXAMPLES])
def test_docstring_example(example: doctest.DocTest):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    start = time.perf_counter()
    result = runner.run(example, out=report.append)
    seconds = time.perf_counter() - start
    assert result.failed == 0, "".join(report)
    assert result.attempted > 0
    assert seconds < TIME_LIMIT, f"{example.name}: the example took {seconds:.1f} s; keep examples tiny"


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_entry_point_has_an_example(name: str):
    assert ">>>" in (inspect.getdoc(getattr(svftune, name)) or ""), f"svftune.{name}'s docstring shows no example"


def test_a_wrong_example_fails():
    bad = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "bad", "<bad>", 0)
    result = doctest.DocTestRunner(optionflags=OPTIONS).run(bad, out=lambda text: None)
    assert result.failed == 1
