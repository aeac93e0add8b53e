"""The chaos suite's table: every scenario adds one row (also when its bound fails); the session prints
the table at the end and writes it to bench_out/chaos_table.md, the source of docs/reliability.md."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.tests.chaos.fabric import dead_owner_leftovers
from pdserve.tests.chaos.load import ChaosTable, Row

OUT_DIR = Path(__file__).resolve().parents[2] / "bench_out"
TABLE_PATH = OUT_DIR / "chaos_table.md"
LOG_DIR = OUT_DIR / "chaos_logs"  # every process's log of the last run, kept for reading after failures
_TABLE = ChaosTable()


@pytest.fixture(scope="session")
def chaos_table() -> ChaosTable:
    return _TABLE


@pytest.fixture(scope="session")
def chaos_log_dir() -> Path:
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    LOG_DIR.mkdir(parents=True)
    return LOG_DIR


@contextlib.contextmanager
def scenario_row(table: ChaosTable, scenario: str, bound: str) -> Iterator[Row]:
    """The row of one scenario: counted by the body, marked FAIL with the reason if a bound fails."""
    row = Row(scenario, bound)
    try:
        yield row
    except BaseException as exc:
        row.verdict = "FAIL: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise
    finally:
        row.leaked = len(dead_owner_leftovers())
        table.rows.append(row)
        print(f"\nchaos row: {table.markdown_row(row)}", flush=True)


@pytest.fixture()
def report(chaos_table: ChaosTable):
    """`with report(name, bound) as row:` around a scenario's fault and its assertions."""
    return lambda scenario, bound: scenario_row(chaos_table, scenario, bound)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TABLE.rows:
        return
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"Chaos suite, {stamp}, {platform.node()} ({_cpus()} CPUs)\n\n{_TABLE.markdown()}\n")
    terminalreporter.write_sep("=", "chaos table")
    terminalreporter.write_line(text)
    TABLE_PATH.parent.mkdir(exist_ok=True)
    TABLE_PATH.write_text(text)
    terminalreporter.write_line(f"written to {TABLE_PATH}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0))
