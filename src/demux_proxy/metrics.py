"""What the proxy counts, for `/metrics`, `/status` and `/status.json` (admin.py).

Only collected when `--admin` is on: without a reader, counting is pure cost on the hot
path. prometheus-client runs in multiprocess mode (values in per-process mmap files in
a private directory, summed at scrape), so the same numbers come out whichever worker
answers a scrape. The mode is chosen by an environment variable read when
prometheus_client is first imported, hence `enable()` before any import of it.

Label cardinality is bounded: labels are egress addresses (fixed at start), status
classes, directions and error kinds; destination hosts never become labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final, Protocol

from demux_proxy.egress import Egress

_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_PREFIX: Final = "demux-proxy-metrics-"


def enable() -> str:
    """Switch prometheus-client to multiprocess mode in a fresh private directory, named
    after this process (removed at exit; see `_sweep` for a process that had no exit)."""
    import tempfile  # only with --admin

    _sweep(tempfile.gettempdir())
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _sweep(tmp: str) -> None:
    """Remove the directories earlier proxies of this user left when they were killed
    (SIGKILL, the OOM killer: a service restarted in a loop would fill the temporary
    directory): ours by name, owner and a process id that no longer runs."""
    import shutil
    import stat

    uid = os.getuid()
    with os.scandir(tmp) as entries:
        for entry in entries:
            pid = entry.name[len(_PREFIX) :].partition("-")[0]
            if not entry.name.startswith(_PREFIX) or not pid.isdigit():
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or _running(int(pid)):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


def process_gone(pid: int) -> None:
    """A worker died: its live gauges (queue depth, idle connections, cooling hosts) leave
    what /metrics sums. Its counters stay: what it counted happened. A no-op without
    --admin (no multiprocess directory)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Recorder(Protocol):
    def request(
        self, egress: str | None, status: int, seconds: float, down: int, up: int
    ) -> None: ...
    def upstream_connection(self, egress: str, *, reused: bool) -> None: ...
    def error(self, kind: str) -> None: ...
    def pooled(self, idle_by_egress: dict[str, int]) -> None: ...
    def queued(self, rule: str, delta: int) -> None: ...
    def cooling(self, hosts_by_egress: dict[str, int]) -> None: ...
    def cooled(self, egress: str, status: int) -> None: ...


class NoMetrics:
    """The recorder when no admin listener will ever read the numbers."""

    def request(self, egress: str | None, status: int, seconds: float, down: int, up: int) -> None:
        pass

    def upstream_connection(self, egress: str, *, reused: bool) -> None:
        pass

    def error(self, kind: str) -> None:
        pass

    def pooled(self, idle_by_egress: dict[str, int]) -> None:
        pass

    def queued(self, rule: str, delta: int) -> None:
        pass

    def cooling(self, hosts_by_egress: dict[str, int]) -> None:
        pass

    def cooled(self, egress: str, status: int) -> None:
        pass


class Metrics:
    """Created in each worker after the fork (values are per process)."""

    def __init__(self, egress: Sequence[Egress]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Our own registry: the global default one would also export this process's
        # platform metrics, which mean nothing summed over workers.
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "demux_requests",
            "Requests answered, by egress address and status class",
            ["egress", "status_class"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "demux_request_duration_seconds",
            "Time from request head to end of response, by egress address",
            ["egress"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._bytes = Counter(
            "demux_body_bytes",
            "Body bytes relayed, by egress address and direction",
            ["egress", "direction"],
            registry=self.registry,
        )
        self._connections = Counter(
            "demux_upstream_connections",
            "Upstream connections used, by egress address: opened new or reused from the pool",
            ["egress", "how"],
            registry=self.registry,
        )
        self._idle = Gauge(
            "demux_upstream_connections_idle",
            "Idle upstream connections kept warm in the pools, by egress address",
            ["egress"],
            registry=self.registry,
            multiprocess_mode="livesum",  # summed over the workers alive now
        )
        self._egress = [e.address for e in egress]
        # Hosts become labels only as the --host-rate patterns the operator named.
        self._queue = Gauge(
            "demux_queue_depth",
            "Requests waiting for an address with budget, by --host-rate rule",
            ["rule"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._cooling = Gauge(
            "demux_cooling_hosts",
            "Hosts an egress address is cooling down for (429/503/--ban-status),"
            " the most any one worker knows",
            ["egress"],
            registry=self.registry,
            # Each worker learns a cooldown for itself: the sum would count one (address,
            # host) pair once per worker that met its 429. The most any worker knows.
            multiprocess_mode="livemax",
        )
        self._errors = Counter(
            "demux_errors", "Failed exchanges by kind", ["kind"], registry=self.registry
        )
        # Every cooling answer, also those replayed from another address (which
        # demux_requests_total, one per client request, never shows): the rate limits met.
        self._cooled = Counter(
            "demux_cooling_responses",
            "Cooling answers (429/503/--ban-status) by egress and status, replayed ones too",
            ["egress", "status"],
            registry=self.registry,
        )
        # Children resolved once: labels() takes a lock and a dict lookup per call.
        self._by_status: dict[tuple[str, str], Any] = {}
        self._latency_of: dict[str, Any] = {}
        self._bytes_of: dict[tuple[str, str], Any] = {}
        for e in [*(e.address for e in egress), "none"]:
            for cls in ("1xx", "2xx", "3xx", "4xx", "5xx"):
                self._by_status[(e, cls)] = self._requests.labels(e, cls)
            self._latency_of[e] = self._latency.labels(e)
            self._bytes_of[(e, "down")] = self._bytes.labels(e, "down")
            self._bytes_of[(e, "up")] = self._bytes.labels(e, "up")

    def request(self, egress: str | None, status: int, seconds: float, down: int, up: int) -> None:
        e = egress or "none"
        child = self._by_status.get((e, f"{status // 100}xx"))
        if child is None:  # an address added since start; bounded by the host's addresses
            child = self._requests.labels(e, f"{status // 100}xx")
        child.inc()
        latency = self._latency_of.get(e)
        (latency if latency is not None else self._latency.labels(e)).observe(seconds)
        for direction, n in (("down", down), ("up", up)):
            if n:
                counter = self._bytes_of.get((e, direction))
                (counter if counter is not None else self._bytes.labels(e, direction)).inc(n)

    def upstream_connection(self, egress: str, *, reused: bool) -> None:
        self._connections.labels(egress, "reused" if reused else "opened").inc()

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()

    def queued(self, rule: str, delta: int) -> None:
        self._queue.labels(rule).inc(delta)

    def cooled(self, egress: str, status: int) -> None:
        self._cooled.labels(egress, str(status)).inc()

    def cooling(self, hosts_by_egress: dict[str, int]) -> None:
        for egress in self._known(hosts_by_egress):
            self._cooling.labels(egress).set(hosts_by_egress.get(egress, 0))

    def pooled(self, idle_by_egress: dict[str, int]) -> None:
        for egress in self._known(idle_by_egress):
            self._idle.labels(egress).set(idle_by_egress.get(egress, 0))

    def _known(self, by_egress: dict[str, int]) -> list[str]:
        """Every address a gauge was set for, with those new in `by_egress` (added by
        re-discovery since start); one that was removed reads 0 from then on."""
        for egress in by_egress:
            if egress not in self._egress:
                self._egress.append(egress)
        return self._egress


def scrape() -> tuple[bytes, list[Any]]:
    """(Prometheus text exposition, metric families) summed over every worker's files."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), list(registry.collect())
