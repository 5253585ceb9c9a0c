"""Where stages run: in this process, in order (the default), or as Ray tasks across a cluster.

The Ray executor submits every stage of the plan at once as a task that depends on its ancestors' tasks, so
Ray starts each stage as soon as its inputs are ready: the branches of a recipe and the trials of a search
run side by side. A task runs the same `run_stage` the local executor runs, against the same stage cache
(a path every node shares, or a URL such as s3://bucket/prefix), so a stage is a pure function of its key
wherever it runs: its entry appears atomically or not at all, and a task Ray retries after its worker died
finds either nothing or the finished entry. Each task declares what it needs: one CPU and the memory the
stage is estimated to hold (recipec.build.stages.MEMORY_FACTORS, sized from the source model's config).

`recipec build --executor ray [--ray-address ADDR]` (or RECIPEC_EXECUTOR=ray, RAY_ADDRESS): with no address
Ray starts a local instance, as `ray.init()` does.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field


import networkx as nx

from recipec.build.cache import StageCache
from recipec.build.stages import DEFAULT_MEMORY_FACTOR, MEMORY_FACTORS, StageRun, run_stage
from recipec.errors import PassError, RecipecError
from recipec.plan.stages import SOURCE, Plan

EXECUTORS = ("local", "ray")
TASK_RETRIES = 3  # a worker that dies mid-stage (OOM kill, lost node) gets its stage rerun elsewhere


def hostname() -> str:
    return socket.gethostname()


@dataclass
class StageFailure:
    stage: str
    message: str


@dataclass
class Outcome:
    """What running a plan gave: the finished stages, and (with keep_going) the ones that failed or were
    skipped because an ancestor failed."""
    runs: dict[str, StageRun]
    failures: dict[str, StageFailure] = field(default_factory=dict)


class LocalExecutor:
    name = "local"

    def run(self, plan: Plan, cache: StageCache, device: str, force: bool, keep_going: bool = False,
            done: dict[str, StageRun] | None = None) -> Outcome:
        """The stages in order. `done`: runs by cache key that this build already has (a search's shared
        stages), reused without a second look at the cache; `keep_going`: a failed stage skips its descendants
        and the others go on (a search's trials), instead of ending the build."""
        outcome = Outcome({})
        for stage in plan.stages:
            broken = [p for p in nx.ancestors(plan.graph, stage.id) if p in outcome.failures]
            if broken:
                outcome.failures[stage.id] = StageFailure(stage.id, outcome.failures[broken[0]].message)
                continue
            try:
                outcome.runs[stage.id] = reuse(stage, done) or run_stage(plan, stage, outcome.runs, cache, device, force)
            except PassError as exc:
                if not keep_going:
                    raise
                outcome.failures[stage.id] = StageFailure(stage.id, str(exc))
                continue
            outcome.runs[stage.id].node = outcome.runs[stage.id].node or hostname()
        return outcome

    def server(self, plan: Plan, cache: StageCache) -> None:
        """Serving measurements run in this machine's profiling process (recipec.profile.profiler)."""
        return None

    def close(self) -> None:
        pass


def reuse(stage, done: dict[str, StageRun] | None) -> StageRun | None:
    """This build's earlier run of the same key, as a run of `stage` (its id may differ between plans)."""
    run = (done or {}).get(stage.key)
    return StageRun(stage, run.entry, run.cached, run.seconds, run.node) if run else None


def stage_memory_bytes(plan: Plan, stage_id: str) -> int:
    """What a stage is estimated to hold, from the source model's config (no weights are read): its float32
    weights times the pass's factor, the factors the local memory guard uses; 0 where no config is readable."""
    from recipec.plan.planner import source_config
    from recipec.source.config import config_parameters

    stage = plan.stage(stage_id)
    factor = 2.0 if stage.op == SOURCE else MEMORY_FACTORS.get(stage.op, DEFAULT_MEMORY_FACTOR)
    try:
        config = source_config(plan.recipe.resolved["model"], plan.recipe.base_dir)
    except RecipecError:
        return 0
    return int(4 * config_parameters(config) * factor) if config is not None else 0


__all__ = ["EXECUTORS", "LocalExecutor", "Outcome", "StageFailure", "hostname", "reuse", "stage_memory_bytes"]
