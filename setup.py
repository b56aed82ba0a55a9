"""Compile the per-request modules with mypyc; everything else stays plain Python.

The metadata lives in pyproject.toml; this file only adds the compiled modules. mypyc
turns the same type-checked source into C extensions: a keep-alive request costs about a
third fewer instructions (docs/performance.md, "Fifth session"). The source is unchanged
and runs as it is where no compiler is at hand: DEMUX_PROXY_COMPILE=0 installs it pure.
"""

from __future__ import annotations

import os

from setuptools import setup

# The modules every request passes through. Not here: start-up and the CLI (no gain),
# egress.py (its frozen Egress travels pickled in the Config through launch.py's exec),
# errors.py (exceptions that subclass built-in ones must stay Python classes).
HOT_PATH = [
    "src/demux_proxy/http1/framing.py",
    "src/demux_proxy/http1/headers.py",
    "src/demux_proxy/http1/parser.py",
    "src/demux_proxy/http1/writer.py",
    "src/demux_proxy/bodies.py",
    "src/demux_proxy/dispatch.py",
    "src/demux_proxy/exchange.py",
    "src/demux_proxy/intercept.py",
    "src/demux_proxy/limits.py",
    "src/demux_proxy/log.py",
    "src/demux_proxy/metrics.py",
    "src/demux_proxy/outbound.py",
    "src/demux_proxy/outcome.py",
    "src/demux_proxy/policy.py",
    "src/demux_proxy/pool.py",
    "src/demux_proxy/relay.py",
    "src/demux_proxy/route.py",
    "src/demux_proxy/scheduler.py",
    "src/demux_proxy/server.py",
    "src/demux_proxy/stream.py",
    "src/demux_proxy/upstream.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get("DEMUX_PROXY_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    # -Os: the compiled library is 1.1 MB of code instead of 1.5, and all of it is resident
    # (the kernel maps it around every page touched); 0.35 MB less resident per process
    # for 4.5 % more instructions per request than -O3 (docs/performance.md).
    return list(mypycify(["--config-file=pyproject.toml", *HOT_PATH], opt_level="s"))


setup(ext_modules=_ext_modules())
