"""pdserve's own CPU ops (``kernels/csrc/*.cc``): built once per machine, cached, loaded in ~10 ms.

The ops are Paddle custom operators compiled with Paddle's C++ extension tooling. Building takes
~15 s, so it happens once per (sources, Paddle version, compiler flags) into
``$XDG_CACHE_HOME/pdserve/ops/<key>/`` (``deploy/setup.sh`` does it ahead of time with
``python -m pdserve.kernels.cpu_ops``). The build runs in a child process, so its compiler output
never reaches the caller's stdout (an engine process speaks its protocol there), and under a file
lock, so engine processes starting together build it once. Every later process only registers the
cached library.

When the ops cannot be had (not x86-64 with AVX2 and FMA, no compiler, a failed build) ``load``
says why once in the log and returns False; callers then run the reference Paddle ops. A failed
build leaves ``BUILD_FAILED`` (the compiler's last lines) in the cache directory, so the node's
other processes and later starts do not each spend the build's time failing again.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import paddle

log = logging.getLogger(__name__)

LIBRARY = "pdserve_cpu_ops"
SOURCES = tuple(
    Path(__file__).resolve().parent / "csrc" / name for name in ("packed_linear.cc", "layer_ops.cc")
)
CXX_FLAGS = ("-O3", "-mavx2", "-mfma")
_REQUIRED_CPU_FLAGS = {"avx2", "fma"}


def cache_dir() -> Path:
    """Where this build of the library lives: keyed by its sources, Paddle's version and the flags."""
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(paddle.__version__.encode())
    digest.update(" ".join(CXX_FLAGS).encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "pdserve" / "ops" / digest.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / f"{LIBRARY}.so"


def failure_path() -> Path:
    """Left by a failed build: later processes skip the ~20 s attempt (``python -m
    pdserve.kernels.cpu_ops`` retries and removes it; new sources get a new cache_dir)."""
    return cache_dir() / "BUILD_FAILED"


def cpu_supported() -> tuple[bool, str]:
    """The library is compiled for AVX2 + FMA: (usable here, why not)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False, f"the CPU is {platform.machine()}, the ops are written for x86-64"
    try:
        flags = {
            flag
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()
        }
    except OSError as exc:
        return False, f"cannot read /proc/cpuinfo ({exc})"
    missing = _REQUIRED_CPU_FLAGS - flags
    return (not missing, f"the CPU lacks {', '.join(sorted(missing))}" if missing else "")


@functools.cache
def load() -> bool:
    """Register the ops in this process (building them first if no cached build exists)."""
    usable, why = cpu_supported()
    if not usable:
        log.info("pdserve CPU ops disabled: %s; using Paddle's own ops", why)
        return False
    path, failed = library_path(), failure_path()  # each hashes the sources: once here
    if not path.exists() and failed.exists():
        log.warning("pdserve CPU ops unavailable: an earlier build failed (%s; run `python -m "
                    "pdserve.kernels.cpu_ops` to retry); using Paddle's own ops", failed)
        return False
    try:
        if not path.exists():
            _build_in_child(failed)
        paddle.utils.cpp_extension.load_op_meta_info_and_register_op(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure means the reference ops, said once
        log.warning("pdserve CPU ops unavailable (%s); using Paddle's own ops", exc)
        return False
    return True


# A build of Paddle without devices makes every tensor a CPU tensor: the place need not be asked.
_ONLY_CPU = not (paddle.is_compiled_with_cuda() or paddle.is_compiled_with_xpu()
                 or paddle.is_compiled_with_rocm() or paddle.device.get_all_custom_device_type())


def takes(x: paddle.Tensor) -> bool:
    """Whether ``x`` is what the ops take as activations: a 2-D float32 CPU tensor.

    Asked before every op of a layer (~50 times a decode step), so it is kept cheap: ``x.dtype ==
    paddle.float32`` costs ~0.6 us (Python-level ``__eq__``) where the identity test costs 0.1 (dtypes
    are singletons; a dtype that were not would only send ``x`` to the Paddle ops), and the place is
    asked only when Paddle was built with devices. An ``==`` check that always asks the place costs
    ~5% of a batch-1 decode step.
    """
    return x.dtype is paddle.float32 and x.ndim == 2 and (_ONLY_CPU or x.place.is_cpu_place())


def _build_in_child(failure_marker: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.kernels.cpu_ops"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        failure_marker.parent.mkdir(parents=True, exist_ok=True)
        failure_marker.write_text("\n".join(tail) + "\n")
        raise RuntimeError(f"building {LIBRARY} failed: {' | '.join(tail)}")


def build() -> Path:
    """Compile the library into the cache (under a lock; a finished build is left alone)."""
    target = library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        from paddle.utils.cpp_extension import load as compile_and_load

        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            compile_and_load(
                name=LIBRARY,
                sources=[str(s) for s in SOURCES],
                extra_cxx_cflags=list(CXX_FLAGS),
                build_directory=work,
                verbose=False,
            )
            built = Path(work) / LIBRARY / f"{LIBRARY}.so"
            partial = target.with_suffix(".so.partial")
            shutil.copyfile(built, partial)
            os.replace(partial, target)  # readers see the whole file or none
    return target


if __name__ == "__main__":
    usable, why = cpu_supported()
    if not usable:
        print(f"pdserve CPU ops not built: {why}")
        sys.exit(0)
    failure_path().unlink(missing_ok=True)  # an explicit build is the retry
    print(f"pdserve CPU ops: {build()}")
