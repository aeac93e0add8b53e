"""The cluster secret of test clusters: one fixed value, and a 0600 file holding it for processes
started with `--cluster-secret-file` (created once per test process, removed when it exits)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

from pdserve.common.secret import ClusterSecret

TEST_SECRET = ClusterSecret(b"pdserve-tests-cluster-secret-0123456789abcdef")


@cache
def test_secret_file() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="pdserve-test-secret-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return TEST_SECRET.write(directory / "cluster.secret")


def secret_flags() -> tuple[str, ...]:
    return ("--cluster-secret-file", str(test_secret_file()))
