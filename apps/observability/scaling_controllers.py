"""The controllers the scaling wave replays: the HPA controller's formulas
(tolerance, stabilization windows, rate policies: Kubernetes'
normalizeDesiredReplicas), KEDA's triggers as its HPA reads them (metricType
AverageValue or Value), a fluid model of each queue, and pods landing on nodes
Karpenter launches and consolidates."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .capacity_inputs import CapacityError
from .scaling_manifests import Requests, Rules, Scaled

TOLERANCE = 0.1  # the HPA controller's default --horizontal-pod-autoscaler-tolerance
HPA_SYNC_S = 15  # the HPA controller's sync period (KEDA's HPAs too)


@dataclass
class Memory:
    """What an HPA remembers: its recent recommendations and scale changes."""

    recommendations: list[tuple[float, int]] = field(default_factory=list)
    changes: list[tuple[float, int]] = field(default_factory=list)


def hpa_proposal(*, current: int, ready: int, ratios: list[float]) -> int:
    """Replicas for metric/target ratios averaged over the ready pods: the current
    count within the tolerance band, else ceil(ready x ratio); the max over metrics."""
    if ready == 0 or not ratios:
        return current
    return max(current if abs(r - 1) <= TOLERANCE else math.ceil(ready * r) for r in ratios)


def hpa_desired(
    *,
    now: float,
    current: int,
    proposal: int,
    low: int,
    high: int,
    up: Rules,
    down: Rules,
    memory: Memory,
) -> int:
    """The replicas an HPA sets: its proposal through the stabilization windows,
    the behavior's rate policies and min/max (Kubernetes' normalizeDesiredReplicas)."""
    memory.recommendations.append((now, proposal))
    horizon = max(up.window_s, down.window_s)
    memory.recommendations = [(t, r) for t, r in memory.recommendations if t > now - horizon - 1]
    ups = [r for t, r in memory.recommendations if t > now - up.window_s or t == now]
    downs = [r for t, r in memory.recommendations if t > now - down.window_s or t == now]
    stabilized = min(max(current, min(ups)), max(downs))
    if stabilized > current:
        desired = min(stabilized, _rate_limit(now, current, up, memory, sign=1), high)
    elif stabilized < current:
        desired = max(stabilized, _rate_limit(now, current, down, memory, sign=-1), low)
    else:
        desired = current
    desired = min(max(desired, low), high)
    if desired != current:
        memory.changes.append((now, desired - current))
    return desired


def _rate_limit(now: float, current: int, rules: Rules, memory: Memory, *, sign: int) -> int:
    """Kubernetes' scale-up limit rounds a Percent policy up (math.Ceil), its
    scale-down limit truncates (int32 of the product)."""
    if rules.select == "Disabled":
        return current
    limits = []
    for policy in rules.policies:
        moved = sum(abs(d) for t, d in memory.changes if t > now - policy.period_s and d * sign > 0)
        start = current - sign * moved
        if policy.kind == "Pods":
            limits.append(start + sign * policy.value)
        elif sign > 0:
            limits.append(math.ceil(start * (1 + policy.value / 100)))
        else:
            limits.append(math.floor(start * (1 - policy.value / 100)))
    most = max if (rules.select == "Max") == (sign > 0) else min
    return most(limits)


@dataclass
class Queue:
    depth: float = 0.0  # jobs waiting
    age_s: float = 0.0  # the oldest one's wait
    in_flight: float = 0.0  # jobs the workers run now

    def step(self, *, arrivals_s: float, served_s: float, dt: float, per_job_s: float) -> None:
        """Jobs arrive and ready workers take them (FIFO, a fluid model): the oldest
        waiting job arrived depth / arrival-rate seconds ago; a job stays
        `per_job_s` on a worker thread, so work done at rate r keeps r x per_job_s
        running."""
        backlog = self.depth + arrivals_s * dt
        done = min(backlog, served_s * dt)
        self.in_flight = done / dt * per_job_s
        self.depth = max(0.0, backlog - done)
        if self.depth < 1e-6:
            self.depth, self.age_s = 0.0, 0.0
        elif arrivals_s > 0:
            self.age_s = self.depth / arrivals_s
        else:
            self.age_s += dt


def keda_proposal(*, scaled: Scaled, queues: dict[str, Queue], current: int) -> tuple[int, bool]:
    """What KEDA's HPA proposes, the max over triggers: an AverageValue trigger
    (an External AverageValue target) ceil(value / threshold), a Value one (an
    External Value target) ceil(current x value / threshold), the current count
    within the tolerance band; and whether any trigger is above its activation."""
    desired, active = 0, False
    for trigger in scaled.triggers:
        value = trigger_value(trigger.query, queues=queues, name=scaled.name)
        active = active or value > trigger.activation
        if trigger.metric_type == "Value":
            ratio = value / trigger.threshold
            wanted = current if abs(ratio - 1) <= TOLERANCE else math.ceil(current * ratio)
        else:
            ratio = value / trigger.threshold / max(current, 1)
            wanted = (
                current
                if current and abs(ratio - 1) <= TOLERANCE
                else math.ceil(round(value / trigger.threshold, 6))
            )
        desired = max(desired, wanted)
    return desired, active


def trigger_value(query: str, *, queues: dict[str, Queue], name: str) -> float:
    """A trigger query's value: the queues it selects (`queue="a"` or
    `queue=~"a|b"`) summed (their oldest age: the max), depth plus tasks in flight
    when it names both; for vLLM's metrics its waiting (and running) requests."""
    if "vllm:" in query:  # waiting requests, plus the running ones when it names them
        vllm = queues["vllm"]
        return vllm.depth + (vllm.in_flight if "num_requests_running" in query else 0.0)
    names: set[str] = set()
    for selector in re.findall(r'queue=~?"([a-z_|]+)"', query):
        names |= set(selector.split("|"))
    unknown = sorted(names - queues.keys())
    if not names or unknown:
        raise CapacityError(f"ScaledObject {name}: query {query!r} names no known queue")
    chosen = [queues[q] for q in sorted(names)]
    if "oldest_age" in query:
        return max(q.age_s for q in chosen)
    value, known = 0.0, False
    if "queue_depth" in query:
        value, known = value + sum(q.depth for q in chosen), True
    if "tasks_in_flight" in query:
        value, known = value + sum(q.in_flight for q in chosen), True
    if known:
        return value
    raise CapacityError(f"ScaledObject {name}: query {query!r} is neither depth nor age")


@dataclass
class Workload:
    name: str
    requests: Requests
    start_s: float
    desired: int
    pods: list[float | None] = field(default_factory=list)  # ready time, None: no node
    memory: Memory = field(default_factory=Memory)
    active_at: float = 0.0  # KEDA: when a trigger was last active

    def ready(self, now: float) -> int:
        return sum(1 for at in self.pods if at is not None and at <= now)

    def resize(self) -> None:
        """Pods follow desired: unscheduled go first, then the newest."""
        while len(self.pods) < self.desired:
            self.pods.append(None)
        if len(self.pods) > self.desired:
            self.pods.sort(key=lambda at: math.inf if at is None else at)
            del self.pods[self.desired :]


@dataclass
class Pool:
    name: str
    cores: float  # usable a node
    memory_mb: float
    gpus: int
    max_nodes: float
    delay_s: float
    consolidate_s: float  # NodePool consolidateAfter: how long a node stays surplus
    nodes: list[float] = field(default_factory=list)  # ready times
    surplus_since: float | None = None

    def fits(self, used: Requests, pod: Requests, now: float) -> bool:
        n = sum(1 for at in self.nodes if at <= now)
        if self.gpus:
            return used.gpus + pod.gpus <= n * self.gpus
        return (
            used.cores + pod.cores <= n * self.cores + 1e-9
            and used.memory_mb + pod.memory_mb <= n * self.memory_mb + 1e-9
        )

    def nodes_for(self, total: Requests) -> int:
        if self.gpus:
            return math.ceil(total.gpus / self.gpus)
        return math.ceil(max(total.cores / self.cores, total.memory_mb / self.memory_mb) - 1e-9)


def _add(a: Requests, b: Requests) -> Requests:
    return Requests(a.cores + b.cores, a.memory_mb + b.memory_mb, a.gpus + b.gpus)


ZERO = Requests(0.0, 0.0, 0)


def queues_drain(
    served: float,
    names: tuple[str, ...],
    queues: dict[str, Queue],
    arrivals: dict[str, float],
    *,
    dt: float,
    per_job_s: float,
) -> None:
    """A workload's ready workers share their rate over its queues in proportion to
    each queue's backlog; a job holds a thread `per_job_s` (threads / rate a pod:
    the threads share the pod's measured throughput), so tasks in flight a pod are
    its utilisation x its threads."""
    backlog = {q: queues[q].depth + arrivals[q] * dt for q in names}
    total = sum(backlog.values())
    for q in names:
        share = served * backlog[q] / total if total else served / len(names)
        queues[q].step(arrivals_s=arrivals[q], served_s=share, dt=dt, per_job_s=per_job_s)


def keda_step(w: Workload, scaled: Scaled, queues: dict[str, Queue], now: float) -> None:
    """KEDA: activation and scale to zero every pollingInterval (after cooldownPeriod
    inactive), its HPA (keda_proposal, within min 1..max) in between."""
    proposal, active = keda_proposal(scaled=scaled, queues=queues, current=w.desired)
    if active:
        w.active_at = now
    if now % scaled.polling_s < 1e-9:
        if w.desired == 0 and active:
            w.desired = max(1, scaled.min_replicas)
            return
        idle_for = now - w.active_at
        if w.desired > 0 and not active and scaled.min_replicas == 0:
            if idle_for >= scaled.cooldown_s:
                w.desired, w.memory = 0, Memory()
                return
    if w.desired == 0 or now % HPA_SYNC_S > 1e-9:
        return
    w.desired = hpa_desired(
        now=now,
        current=w.desired,
        proposal=proposal,
        low=max(1, scaled.min_replicas),
        high=scaled.max_replicas,
        up=scaled.up,
        down=scaled.down,
        memory=w.memory,
    )


def pods_place(workloads: list[Workload], pools: dict[str, Pool], now: float) -> None:
    """Pods land where ready nodes have room; Karpenter launches nodes for the rest
    (within the NodePool limit) and removes the nodes no pod needs."""
    for key, pool in pools.items():
        mine = [w for w in workloads if (w.requests.gpus > 0) == (key == "gpu")]
        used = ZERO
        for w in mine:
            for at in w.pods:
                if at is not None:
                    used = _add(used, w.requests)
        pending = ZERO
        for w in mine:
            for i, at in enumerate(w.pods):
                if at is None and pool.fits(used, w.requests, now):
                    w.pods[i] = now + w.start_s
                    used = _add(used, w.requests)
                elif at is None:
                    pending = _add(pending, w.requests)
        if pending != ZERO:
            launching = sum(1 for at in pool.nodes if at > now)
            room = pool.max_nodes - len(pool.nodes)
            extra = int(min(max(0, pool.nodes_for(pending) - launching), room))
            pool.nodes += [now + pool.delay_s] * extra
        else:
            keep = pool.nodes_for(used)
            if len(pool.nodes) <= keep:
                pool.surplus_since = None
            elif pool.surplus_since is None:
                pool.surplus_since = now
            if pool.surplus_since is not None and now - pool.surplus_since >= pool.consolidate_s:
                pool.nodes, pool.surplus_since = sorted(pool.nodes)[:keep], None
