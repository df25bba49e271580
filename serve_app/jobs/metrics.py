"""The service's Prometheus metrics, kept in the tracker: one scrape, the whole service.

The tracker sees every job, every replica call and (reported by each ingress replica once a
second, see `serve_app.api.http_metrics`) every HTTP request, so its registry holds totals
that are not split per process, whatever the number of ingress replicas. Job counters and
histograms move as jobs change (a book watcher and the dispatch observer); queue depth and
replica gauges are read from the live state at scrape time.

Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serve_app.jobs.job import Job, JobStatus
from serve_app.messages import PoolReport, Priority

# Seconds: a 64 px job on a CPU to an SDXL cold start on a new GPU node.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

# One HTTP request as an ingress replica reports it: route template, method, status, s.
HttpSample = tuple[str, str, int, float]
QueueDepths = Callable[[], Iterable[tuple[str, Priority, int]]]
ReplicaStates = Callable[[], dict[str, dict[str, int]]]
PoolLoads = Callable[[], Iterable[tuple[str, str, int]]]
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("imagegen_jobs", "Jobs that entered each status (queued: submitted)",
                            ["status", "type", "model"], registry=r)
        self.queue_wait = Histogram("imagegen_job_queue_wait_seconds",
                                    "From submission to the replica's start of a job",
                                    ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.run_time = Histogram("imagegen_job_run_seconds",
                                  "From the replica's start to the result of a completed job",
                                  ["model"], buckets=RUN_BUCKETS, registry=r)
        self.steps = Counter("imagegen_denoising_steps",
                             "Denoising steps run (rate() gives steps per second)", ["model"],
                             registry=r)
        self.batch_size = Histogram("imagegen_batch_size", "Jobs per replica call",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.cold_starts = Counter("imagegen_cold_starts",
                                   "Replica calls that waited for a model with no ready replica",
                                   ["model"], registry=r)
        self.cold_start_time = Histogram("imagegen_cold_start_seconds",
                                         "From a cold call's admission to the replica's start",
                                         ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.http = Counter("imagegen_http_requests", "HTTP requests by route and status",
                            ["route", "method", "status"], registry=r)
        self.http_time = Histogram("imagegen_http_request_duration_seconds",
                                   "HTTP request latency, to the end of the response",
                                   ["route", "method"], buckets=HTTP_BUCKETS, registry=r)
        self.webhooks = Counter("imagegen_webhook_deliveries",
                                "Webhook delivery attempts by outcome", ["outcome"], registry=r)
        # Model pools (serve_app.jobs.pools), from what each call's replica reports.
        self.pool_loads = Counter("imagegen_pool_model_loads",
                                  "Pool calls whose replica loaded their model first",
                                  ["pool", "model"], registry=r)
        self.pool_hits = Counter("imagegen_pool_model_hits",
                                 "Pool calls whose replica held their model already",
                                 ["pool", "model"], registry=r)
        self.pool_evictions = Counter("imagegen_pool_model_evictions",
                                      "Models a pool replica evicted (least recently used)",
                                      ["pool", "model"], registry=r)
        self.pool_load_time = Histogram("imagegen_pool_model_load_seconds",
                                        "How long a pool replica took to load a model",
                                        ["pool", "model"], buckets=LOAD_BUCKETS, registry=r)

    def live(self, queue_depths: QueueDepths, replica_states: ReplicaStates,
             pool_loads: PoolLoads = lambda: ()) -> None:
        """Gauges read at scrape time from the tracker's live state."""
        self.registry.register(_LiveGauges(queue_depths, replica_states, pool_loads))

    # -- what moves them -----------------------------------------------------------------

    def job_changed(self, job: Job, before: JobStatus | None) -> None:
        """A book watcher: count status changes, time waits and runs."""
        if before is job.status:
            return
        self.jobs.labels(job.status.value, job.type.value, job.model).inc()
        if job.status is JobStatus.PROCESSING and job.started_at_ms is not None:
            wait_s = (job.started_at_ms - job.created_at_ms) / 1000
            self.queue_wait.labels(job.model).observe(max(0.0, wait_s))
        if job.status is JobStatus.COMPLETED and job.result is not None:
            self.run_time.labels(job.model).observe(job.result.time_taken_ms / 1000)

    def call_admitted(self, model: str, jobs: int) -> None:
        self.batch_size.labels(model).observe(jobs)

    def call_started(self, model: str, cold: bool, waited_s: float) -> None:
        if cold:
            self.cold_starts.labels(model).inc()
            self.cold_start_time.labels(model).observe(waited_s)

    def step(self, model: str) -> None:
        self.steps.labels(model).inc()

    def pool_call(self, pool: str, model: str, report: PoolReport) -> None:
        if report.load_s is None:
            self.pool_hits.labels(pool, model).inc()
        else:
            self.pool_loads.labels(pool, model).inc()
            self.pool_load_time.labels(pool, model).observe(report.load_s)
        for evicted in report.evicted:
            self.pool_evictions.labels(pool, evicted).inc()

    def http_requests(self, samples: Sequence[HttpSample]) -> None:
        for route, method, status, seconds in samples:
            self.http.labels(route, method, str(status)).inc()
            self.http_time.labels(route, method).observe(seconds)

    def webhook_delivery(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveGauges(Collector):
    def __init__(self, queue_depths: QueueDepths, replica_states: ReplicaStates,
                 pool_loads: PoolLoads) -> None:
        self._queue_depths = queue_depths
        self._replica_states = replica_states
        self._pool_loads = pool_loads

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("imagegen_queue_depth", "Jobs waiting, per model and priority",
                                  labels=["model", "priority"])
        for model, priority, count in self._queue_depths():
            depth.add_metric([model, priority.value], count)
        yield depth
        replicas = GaugeMetricFamily("imagegen_replicas", "Model replicas, per state",
                                     labels=["model", "state"])
        for model, states in sorted(self._replica_states().items()):
            for state, count in sorted(states.items()):
                replicas.add_metric([model, state], count)
        yield replicas
        held = GaugeMetricFamily("imagegen_pool_model_replicas",
                                 "Pool replicas holding each pool model now",
                                 labels=["pool", "model"])
        for pool, model, count in self._pool_loads():
            held.add_metric([pool, model], count)
        yield held

    def describe(self) -> Iterator[Metric]:
        return iter(())
