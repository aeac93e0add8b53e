"""The cluster secret: one shared key from which every internal credential is derived.

Nodes and routers of one cluster hold the same secret. Nothing uses it directly: each use derives
its own key with `derive(purpose)` (HMAC-SHA256 of the purpose under the secret), so a key that
leaks from one use (a gRPC credential seen on the wire) reveals neither the secret nor the others.

The secret reaches a process by a file path or by an environment variable the operator names
explicitly (`--cluster-secret-file`, `--cluster-secret-env NAME`), never on a command line.
Running without one takes an explicit `--insecure`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 16
GENERATED_SECRET_BYTES = 32
MAX_SECRET_BYTES = 4096


class ClusterSecretError(ValueError):
    """No usable cluster secret (missing, empty, too short, unreadable); never contains the secret."""


@dataclass(frozen=True)
class ClusterSecret:
    value: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not MIN_SECRET_BYTES <= len(self.value) <= MAX_SECRET_BYTES:
            raise ClusterSecretError(f"a cluster secret must be {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes "
                                     f"(got {len(self.value)})")

    @classmethod
    def generate(cls) -> ClusterSecret:
        # hex text, so the file is also a valid secret for an operator to copy around
        return cls(secrets.token_hex(GENERATED_SECRET_BYTES).encode())

    @classmethod
    def from_file(cls, path: Path) -> ClusterSecret:
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise ClusterSecretError(f"cannot read the cluster secret file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("cluster secret file %s is accessible to other users (mode %o); chmod 600 it",
                        path, stat.S_IMODE(mode))
        return cls(data.strip())

    @classmethod
    def from_env(cls, name: str) -> ClusterSecret:
        value = os.environ.get(name)
        if value is None:
            raise ClusterSecretError(f"the environment variable {name} named by --cluster-secret-env "
                                     "is not set")
        return cls(value.strip().encode())

    def write(self, path: Path) -> Path:
        """Create `path` (mode 0600, refusing to overwrite) holding the secret."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.value + b"\n")
        return path

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for one purpose; different purposes give unrelated keys."""
        return hmac.new(self.value, b"pdserve/v1/" + purpose.encode(), hashlib.sha256).digest()

    @property
    def fingerprint(self) -> str:
        """Safe to log: tells operators whether two processes hold the same secret."""
        return self.derive("fingerprint")[:4].hex()


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts, so (b"ab", b"c") and (b"a", b"bc") differ."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def mac_matches(key: bytes, expected: bytes, *parts: bytes) -> bool:
    return hmac.compare_digest(mac(key, *parts), expected)


# -- command line ---------------------------------------------------------------------------------

def add_cluster_secret_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster secret (authenticates internal traffic)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--cluster-secret-file", type=Path, default=None,
                        help="file holding the cluster secret (mode 0600)")
    source.add_argument("--cluster-secret-env", metavar="NAME", default=None,
                        help="name of the environment variable holding the cluster secret")
    source.add_argument("--insecure", action="store_true",
                        help="run without a cluster secret: internal traffic is NOT authenticated")


def secret_from_args(args: argparse.Namespace) -> ClusterSecret | None:
    """The secret the flags name; None only with --insecure. Raises ClusterSecretError otherwise."""
    if args.cluster_secret_file is not None:
        return ClusterSecret.from_file(args.cluster_secret_file)
    if args.cluster_secret_env is not None:
        return ClusterSecret.from_env(args.cluster_secret_env)
    if args.insecure:
        return None
    raise ClusterSecretError("no cluster secret: pass --cluster-secret-file PATH or --cluster-secret-env "
                             "NAME (or --insecure to run without authentication)")


def require_secret_or_insecure(secret: ClusterSecret | None, insecure: bool, who: str) -> None:
    """Configs call this: on by default, off only when the operator said so (and then loudly)."""
    if secret is not None and insecure:
        raise ClusterSecretError(f"{who}: a cluster secret and insecure are mutually exclusive")
    if secret is None and not insecure:
        raise ClusterSecretError(f"{who} needs a cluster secret (or insecure=True to run without "
                                 "authentication)")


def warn_insecure(who: str) -> None:
    log.warning("INSECURE: %s runs without a cluster secret; data plane, tasks, registry and node RPCs "
                "are NOT authenticated", who)
