"""`demux-proxy start` serves from a fresh interpreter that holds only the serving code.

Once the Config exists, the command line's modules (click, the TOML reader, psutil's
address discovery, the `check` and `config` commands) have done their work, but an
imported module stays resident for the life of a process. So `start` hands the Config
to a new interpreter through an anonymous in-memory file and execs it: the same PID
(systemd, signals and the benchmark harness see one process), the same stdout and stderr,
and about 2 MB less resident memory in the serving process and in every worker forked
from it (docs/performance.md). The original command line stays visible in `ps` after
`--`, its --auth passwords masked. Where the exec cannot happen (no memfd, no
interpreter path), `start` serves in its own process, as before.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Final, NoReturn

from demux_proxy.config import Config, env_note
from demux_proxy.errors import ConfigError, ServeError

MODULE = "demux_proxy.launch"


def serve_fresh(config: Config) -> None:
    """Exec a fresh interpreter that runs `config`; serve here only where that cannot be."""
    _exec_fresh(config)
    _run(config)


def _exec_fresh(config: Config) -> None:
    """Replace this process with `python -m demux_proxy.launch FD`; returns on failure."""
    if not sys.executable or not hasattr(os, "memfd_create"):
        return
    data = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        fd = os.memfd_create("demux-proxy-config", 0)  # no CLOEXEC: the new process reads it
    except OSError:
        return
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        shown = masked(sys.argv)
        os.execv(sys.executable, [sys.executable, "-m", MODULE, str(fd), "--", *shown])
    except OSError:
        os.close(fd)


_SECRET_OPTIONS: Final = ("--auth",)
MASK: Final = "***"


def masked(argv: list[str]) -> list[str]:
    """The command line as `ps` shows it from here on: --auth's passwords masked (every
    local user may read /proc/PID/cmdline; the Config, passwords included, travels in
    the memfd, which only this user can open)."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append(MASK)
            hide_next = False
        elif arg in _SECRET_OPTIONS:
            shown.append(arg)
            hide_next = True
        elif arg.startswith(tuple(f"{o}=" for o in _SECRET_OPTIONS)):
            shown.append(arg.partition("=")[0] + "=" + MASK)
        else:
            shown.append(arg)
    return shown


def _run(config: Config) -> None:
    from demux_proxy.app import run

    try:
        run(config)
    except ServeError as exc:  # in both ways of serving: the fresh interpreter and here
        print(f"demux-proxy: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except ConfigError as exc:
        print(f"demux-proxy: error: {env_note(str(exc), config.env_sources)}", file=sys.stderr)
        sys.exit(exc.exit_status)


def _read_config(fd: int) -> Config:
    try:
        with os.fdopen(fd, "rb") as f:
            config = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(
            f"cannot read the configuration from file descriptor {fd}: {exc}"
        ) from exc
    if not isinstance(config, Config):
        raise ConfigError(f"file descriptor {fd} does not hold a demux-proxy configuration")
    return config


def main(argv: list[str]) -> NoReturn:
    if len(argv) < 2 or not argv[1].isdigit():
        print(f"usage: python -m {MODULE} FD (run by `demux-proxy start`)", file=sys.stderr)
        sys.exit(2)
    try:
        _run(_read_config(int(argv[1])))
    except ConfigError as exc:
        print(f"demux-proxy: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_status)
    sys.exit(0)


if __name__ == "__main__":
    main(sys.argv)
