"""Tracker shards: which tracker owns which models' jobs.

One tracker actor owns every job of the models it is given: their queues, lanes, replica
calls, progress and webhooks. With `tracker_shards: N` (the app's args) the served models are
dealt out to N trackers, so N processes share the work a single tracker did; they share one
job store (Redis), and the ingress routes a submit by its model and a job's other calls by
the model its stored record names. Shard 0 is the primary: it also takes what belongs to no
model (the HTTP metrics the ingress reports, per-caller notes, pruning, the warm workers,
and failing stored jobs of models that are no longer served).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from serve_app.errors import ConfigError, NotThisShard

PRIMARY = 0


@dataclass(frozen=True)
class ShardMap:
    """The served models of each shard (disjoint; shard 0 first)."""

    shards: tuple[frozenset[str], ...]

    @classmethod
    def deal(cls, served: Sequence[str], count: int,
             groups: Mapping[str, str] | None = None) -> ShardMap:
        """Models dealt to `count` shards in turn, in the order given (the registry's);
        models with the same group (a model pool's) are dealt together, as one."""
        if count < 1:
            raise ConfigError(f"tracker_shards must be at least 1, not {count}")
        units: dict[str, list[str]] = {}
        for model in served:
            units.setdefault((groups or {}).get(model, f"model:{model}"), []).append(model)
        dealt = list(units.values())
        if count > max(1, len(dealt)):
            raise ConfigError(
                f"tracker_shards is {count} but {len(dealt)} model(s) or pool(s) are served: "
                "a shard owns whole models and pools, so use at most one shard per each")
        return cls(tuple(frozenset(m for unit in dealt[i::count] for m in unit)
                         for i in range(count)))

    @property
    def count(self) -> int:
        return len(self.shards)

    @property
    def served(self) -> frozenset[str]:
        return frozenset().union(*self.shards)

    def of(self, model: str) -> int:
        """The shard of a model's jobs; a model no shard serves is the primary's (it
        refuses its submits and fails its stored jobs)."""
        for index, models in enumerate(self.shards):
            if model in models:
                return index
        return PRIMARY

    def owns(self, index: int, model: str) -> bool:
        return self.of(model) == index

    def check_model(self, index: int, model: str) -> None:
        """Refuse a submit of another shard's model (retryable: it reached shard `index`
        from an ingress of an older deployment)."""
        if model in self.served and not self.owns(index, model):
            raise NotThisShard(f"Model {model}'s jobs are another tracker shard's (the "
                               "service is being redeployed?); retry shortly",
                               retry_after_s=2)

    def check_mine(self, index: int, job_id: str, model: str, ended: bool) -> None:
        """Refuse a call about another shard's unfinished job: that shard alone may change
        it. The call reached shard `index` by mistake (an ingress of an older deployment,
        or one asking every shard in turn while the store is down), so it is a retryable
        503, never a final answer. An ended job may be read by any shard."""
        if not ended and not self.owns(index, model):
            raise NotThisShard(f"Job {job_id} is another tracker shard's; retry shortly",
                               retry_after_s=2)


def tracker_deployment_name(index: int) -> str:
    """`Tracker` for the primary (the name a single-tracker app has always had)."""
    return "Tracker" if index == PRIMARY else f"Tracker-{index}"
