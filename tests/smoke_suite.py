"""The smoke suite run once per test session (shared by test_suite.py and test_report.py), interrupted on purpose.

First pass: one item fails with an error of its own (the suite must go on), then the suite is interrupted (a
KeyboardInterrupt, as from Ctrl-C) a few items later. Second pass: a plain rerun, which must skip what is done,
retry the failed item and finish the rest.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from malloc.bench.suite import Item, load_suite
from malloc.bench.sweep import SuiteOutcome, SuiteRunner

FAIL_AT = 3  # 1-based position of the item that fails in the first pass
INTERRUPT_AT = 6  # ... and of the item during which the first pass is interrupted


class FlakyRunner(SuiteRunner):
    """A runner whose ``FAIL_AT``-th item raises an error and whose ``INTERRUPT_AT``-th item is interrupted."""

    def _execute(self, item: Item) -> dict:
        position = self.items.index(item) + 1
        if position == FAIL_AT:
            raise RuntimeError("simulated failure of one item")
        if position == INTERRUPT_AT:
            raise KeyboardInterrupt
        return super()._execute(item)


@dataclass
class SmokeRun:
    results: Path  # the results root; the suite is in results / "smoke"
    items: list[Item]
    first_pass: list[str] = field(default_factory=list)  # item ids started in each pass
    second_pass: list[str] = field(default_factory=list)
    interrupted: bool = False
    outcome: SuiteOutcome | None = None

    @property
    def folder(self) -> Path:
        return self.results / "smoke"


@functools.cache
def smoke_run() -> SmokeRun:
    results = Path(tempfile.mkdtemp(prefix="malloc-smoke-suite-"))
    atexit.register(shutil.rmtree, results, ignore_errors=True)
    spec = load_suite("smoke")
    flaky = FlakyRunner(spec, results, command="malloc bench --suite smoke")
    run = SmokeRun(results, flaky.items)
    try:
        flaky.run(on_item=lambda item: run.first_pass.append(item.id))
    except KeyboardInterrupt:
        run.interrupted = True
    run.outcome = SuiteRunner(spec, results, command="malloc bench --suite smoke").run(
        on_item=lambda item: run.second_pass.append(item.id))
    return run
