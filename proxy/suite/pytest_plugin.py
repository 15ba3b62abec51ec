"""pytest plugin: run a pinned never-regress suite inside a team's own pytest run.

    pytest --mirrorgate-suite DIR --mirrorgate-model SPEC [--mirrorgate-role champion]

adds one test per pinned case, named ``mirrorgate[<case id>]``. SPEC is what ``mirrorgate
suite run --model`` takes. Registered as the ``mirrorgate`` pytest11 entry point, so it
is loaded in every pytest run of an environment where mirrorgate is installed: without
``--mirrorgate-suite`` it adds nothing and imports nothing beyond this module (the heavy
imports happen inside the hooks, only when the option is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mirrorgate", "mirrorgate pinned-failure suite")
    group.addoption("--mirrorgate-suite", metavar="DIR", help="pinned suite folder to run")
    group.addoption("--mirrorgate-model", metavar="SPEC", help=".onnx, backend YAML or config")
    group.addoption(
        "--mirrorgate-role",
        choices=("candidate", "champion"),
        default="candidate",
        help="with a mirrorgate config as SPEC: which of its models",
    )


def pytest_configure(config: pytest.Config) -> None:
    suite = config.getoption("--mirrorgate-suite", default=None)
    if suite and not config.getoption("--mirrorgate-model", default=None):
        raise pytest.UsageError("--mirrorgate-suite needs --mirrorgate-model")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, so they apply to cases too
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    suite_dir = config.getoption("--mirrorgate-suite", default=None)
    if not suite_dir:
        return
    collector = SuiteCollector.from_parent(
        session, path=Path(suite_dir).resolve() / "manifest.json"
    )
    items.extend(collector.collect())


class SuiteCollector(pytest.File):
    """The suite's manifest as a pytest file; the model runs once, lazily, for all cases."""

    _results: dict[str, Any] | None = None
    _error: str | None = None

    def collect(self) -> list[pytest.Item]:
        from proxy.core.errors import MirrorgateError
        from proxy.suite.runner import load_suite

        try:
            self.suite = load_suite(self.path.parent)
        except MirrorgateError as exc:
            raise pytest.UsageError(f"--mirrorgate-suite: {exc.message}") from exc
        return [
            CaseItem.from_parent(self, name=f"mirrorgate[{c.id}]", case_id=c.id)
            for c in self.suite.cases
        ]

    def results(self) -> dict[str, Any]:
        if self._results is None and self._error is None:
            import asyncio

            from proxy.suite.runner import run_suite_on

            opts = self.config.option
            try:
                result = asyncio.run(
                    run_suite_on(self.suite, opts.mirrorgate_model, role=opts.mirrorgate_role)
                )
                self._results = {c.id: c for c in result.cases}
            except Exception as exc:  # reported on every case, not a crash of the run
                self._error = f"{type(exc).__name__}: {exc}"
        if self._error is not None:
            raise RuntimeError(f"model {self.config.option.mirrorgate_model}: {self._error}")
        assert self._results is not None
        return self._results


class CaseFailed(AssertionError):
    pass


class CaseItem(pytest.Item):
    def __init__(self, *, case_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case_id = case_id

    def runtest(self) -> None:
        parent = self.parent
        assert isinstance(parent, SuiteCollector)
        result = parent.results()[self.case_id]
        if not result.passed:
            raise CaseFailed(f"pinned case {self.case_id} regressed: {result.detail}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, CaseFailed | RuntimeError):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name
