"""Small helpers for the tests that build their own network namespaces (iproute2), and
for those that need to know what this host's own network offers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest


def ipv6_loopback_available() -> bool:
    """Whether ::1 can be bound here (a container may have no IPv6 at all)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; the caller looks at the result."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def must(*args: str) -> None:
    """Run `ip ARGS`; fail loudly with ip's own message."""
    proc = ip(*args)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


def ns_ip(ns: str, *args: str) -> None:
    """`ip -n NS ARGS`, failing loudly."""
    must("-n", ns, *args)


def ns_sh(ns: str, script: str) -> None:
    """A shell script inside the namespace, failing loudly."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script!r} in {ns} failed: {proc.stderr.strip()}")


def add_namespace_or_skip(name: str) -> None:
    """`ip netns add NAME`, or skip the test with the reason this host cannot."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    proc = ip("netns", "add", name)
    if proc.returncode != 0:
        pytest.skip(f"`ip netns add` failed (no permission?): {proc.stderr.strip()}")
