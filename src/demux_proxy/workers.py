"""`--workers N`: N forked processes accepting on one port with SO_REUSEPORT.

The parent reserves the port (bound, never listening, so the kernel hands it no
connections), builds what workers share, forks them, waits until each listens, then
only supervises: it forwards SIGTERM/SIGINT, restarts a worker that dies unasked, and
exits 0 once all have drained (1 when it gave up on workers that kept dying). Rotation
stays global through `SharedCursor`; session ids stay unique by striding (see
app.serve); each worker keeps its own upstream pool and leaf certificate cache (a name
may be minted once per worker).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Final

import uvloop

from demux_proxy import log, metrics
from demux_proxy.app import Shared, announce, listen_error, serve
from demux_proxy.errors import ConfigError, ServeError
from demux_proxy.limits import parse_host_rate
from demux_proxy.scheduler import SharedBuckets, SharedCursor

READY_TIMEOUT_S = 30.0
# What the supervisor handles, and a worker must not before its own handlers are set.
_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_PR_SET_PDEATHSIG = 1
# A worker that keeps dying is a bug, not bad luck: stop restarting after this many a minute.
MAX_RESTARTS_PER_MINUTE = 5
# How long a shared lock may stay taken after a worker died before the dead one is
# taken to hold it: its critical sections last microseconds.
STUCK_LOCK_S = 0.5


def reserve_port(host: str, port: int, option: str = "") -> tuple[socket.socket, int]:
    """Bind (never listen) host:port with SO_REUSEPORT, for the workers to join.

    Any socket of this user that sets SO_REUSEPORT may join a port, another demux-proxy
    started on it by mistake too (the kernel would then split clients between the two).
    So the port is first bound without it: that fails while anyone holds the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            probe.bind((host, port))
        except OSError as exc:
            raise listen_error(host, port, exc, option) from exc
        finally:
            probe.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise listen_error(host, port, exc, option) from exc
    return sock, sock.getsockname()[1]


def _worker(
    shared: Shared,
    cursor: SharedCursor,
    buckets: SharedBuckets,
    index: int,
    conn: Connection,
    generation: int,
) -> None:
    # The parent's Python-level handlers were inherited by fork: the loop installs ours.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Ignored, not the default (which kills), until serve() installs its handler: the
    # supervisor forwards SIGHUP to workers still starting too.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # blocked by spawn()
    _die_with_parent()
    try:
        uvloop.run(
            serve(
                shared,
                cursor,
                worker=index,
                ready=lambda port: conn.send(port),
                buckets=buckets,
                rediscover=generation > 0,
                generation=generation,
            )
        )
    except ConfigError as exc:
        conn.send(exc)  # raised again in the supervisor, its exit status with it
        sys.exit(exc.exit_status)
    finally:
        # A worker leaves by os._exit: nothing else would write what is pending.
        shared.events.flush(log.EXIT_WAIT_S)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, however it dies (even by
    SIGKILL), so no orphaned worker keeps the port and the log pipe."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own shutdown still stops every worker
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def release_dead_locks(cursor: SharedCursor, buckets: SharedBuckets, wait_s: float) -> list[str]:
    """Release the shared locks a dead worker left taken; the names of those it did.

    Inner lock first: a live worker may hold the rotation lock while it waits for the
    buckets' (a budget is looked at inside the rotation's scan), never the other way
    round. Freed of a dead holder, the buckets' lets that worker finish and free the
    rotation's; looked at first, the rotation's would seem stuck, and releasing it
    would let two workers rotate at once and the live one fail its release."""
    released = []
    if buckets.release_if_stuck(wait_s):
        released.append("host-rate")
    if cursor.release_if_stuck(wait_s):
        released.append("rotation")
    return released


class _Supervisor:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.events = shared.events
        self.events.share()  # the workers write to one stdout: lines must stay whole
        self.ctx: ForkContext = multiprocessing.get_context("fork")
        self.cursor = SharedCursor(self.ctx)
        # One bucket per (address, --host-rate rule), shared: budgets hold across workers.
        config = shared.config
        patterns = [parse_host_rate(text).pattern for text in config.host_rate]
        keys = [(e.address, pattern) for e in config.egress for pattern in patterns]
        self.buckets = SharedBuckets(self.ctx, keys)
        self.procs: dict[int, BaseProcess] = {}
        self.stopping = False
        self.gave_up = False  # workers kept dying: the exit says it failed
        self.restarts: list[float] = []
        self.spawned: dict[int, int] = {}  # per index: workers forked so far

    def spawn(self, index: int) -> Connection:
        """Fork worker `index`. A restarted one (generation 1 on) looks for the host's
        addresses first: the others may have re-discovered since start, and rotation
        needs the same list."""
        generation = self.spawned.get(index, 0)
        self.spawned[index] = generation + 1
        parent_end, child_end = self.ctx.Pipe(duplex=False)
        self.events.flush()  # nothing pending may be written twice by parent and child
        proc = self.ctx.Process(
            target=_worker,
            args=(self.shared, self.cursor, self.buckets, index, child_end, generation),
            name=f"demux-proxy-worker-{index}",
        )
        # Blocked across the fork: a signal there would run the supervisor's handler in
        # the new worker (on its copy of the supervisor's state). The worker unblocks
        # them once its own dispositions are set; here they arrive after start().
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child_end.close()
        self.procs[index] = proc
        return parent_end

    def await_ready(self, index: int, conn: Connection) -> None:
        try:
            answer = conn.recv() if conn.poll(READY_TIMEOUT_S) else "did not start in time"
        except EOFError:
            answer = f"worker {index} exited during start"
        finally:
            conn.close()
        if isinstance(answer, ConfigError):
            raise answer
        if not isinstance(answer, int):
            raise ConfigError(str(answer))

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def forward_hup(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP: every worker looks for added or removed egress addresses."""
        for proc in self.procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    def watch(self) -> None:
        while self.procs:
            wait([p.sentinel for p in self.procs.values()], timeout=1.0)
            for index, proc in list(self.procs.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del self.procs[index]
                if proc.pid is not None:
                    metrics.process_gone(proc.pid)
                if proc.exitcode != 0:
                    self.release_locks(index, proc.exitcode)
                if not self.stopping:
                    self.restart(index, proc.exitcode)

    def release_locks(self, index: int, exitcode: int | None) -> None:
        """A worker that died mid-request may have held the cursor's or the buckets' lock."""
        for name in release_dead_locks(self.cursor, self.buckets, STUCK_LOCK_S):
            self.events.warning(
                "a dead worker held a shared lock: released",
                worker=index,
                exitcode=exitcode,
                lock=name,
            )

    def restart(self, index: int, exitcode: int | None) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > MAX_RESTARTS_PER_MINUTE:
            self.events.error("workers keep dying: stopping", worker=index, exitcode=exitcode)
            self.gave_up = True
            self.on_signal(signal.SIGTERM, None)
            return
        self.events.error("worker died: restarting it", worker=index, exitcode=exitcode)
        try:
            self.await_ready(index, self.spawn(index))
        except ConfigError as exc:
            self.events.error("worker restart failed", worker=index, error=str(exc))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.join()
        self.procs.clear()


def supervise(shared: Shared) -> None:
    config, events = shared.config, shared.events
    reserved, port = reserve_port(config.listen_host, config.listen_port)
    config = replace(config, listen_port=port)
    admin_reserved = None
    if config.admin is not None:
        admin_reserved, admin_port = reserve_port(*config.admin, option="--admin")
        config = replace(config, admin=(config.admin[0], admin_port))
    sup = _Supervisor(replace(shared, config=config))
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    signal.signal(signal.SIGHUP, sup.forward_hup)
    try:
        try:
            for index in range(config.workers):
                if sup.stopping:
                    break
                try:
                    sup.await_ready(index, sup.spawn(index))
                except ConfigError:
                    if not sup.stopping:  # else it ended because it was told to
                        raise
        except BaseException:
            sup.stop_all()
            raise
        if sup.stopping:  # SIGTERM/SIGINT during start-up: stop what started, not serve
            sup.on_signal(signal.SIGTERM, None)  # one spawned after the signal, too
            sup.watch()
            events.info("stopped during start-up")
            return
        announce(events, config, shared.ca, port)
        events.flush()
        sup.watch()
        if sup.gave_up:
            raise ServeError(
                f"workers kept dying (over {MAX_RESTARTS_PER_MINUTE} restarts in a minute)"
            )
    finally:
        reserved.close()
        if admin_reserved is not None:
            admin_reserved.close()
