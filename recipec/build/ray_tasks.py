"""The Ray executor: stages as Ray tasks that depend on their ancestors' tasks, and serving measurements as
tasks that hold a whole node. Imported only when a build asks for `--executor ray` (ray is the `ray` extra).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import networkx as nx

from recipec.build.cache import StageCache
from recipec.build.executor import TASK_RETRIES, Outcome, StageFailure, hostname, reuse, stage_memory_bytes
from recipec.build.stages import StageRun, run_stage
from recipec.core import console
from recipec.errors import PassError, RecipecError, UsageError, one_line
from recipec.plan.stages import Plan


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'recipec[ray]' (or pip install 'ray>=2.9')") from None
    return ray


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None, cache_root: str | None):
        self.ray = import_ray()
        self.address, self.cache_root = address, cache_root
        if not self.ray.is_initialized():
            _probe(address)
            try:
                self.ray.init(address=address, log_to_driver=True, include_dashboard=False,
                              logging_level="ERROR", configure_logging=True,
                              runtime_env={"env_vars": forwarded_environment()})
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise PassError(f"cannot reach the Ray cluster at {address or 'a new local instance'}: "
                                f"{one_line(exc)}") from None
        self._stage = self.ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False)(_stage_task)

    def run(self, plan: Plan, cache: StageCache, device: str, force: bool, keep_going: bool = False,
            done: dict[str, StageRun] | None = None) -> Outcome:
        """Every stage submitted at once, each after its ancestors' tasks (SPREAD over the nodes); then each
        finished entry is read from the shared cache into this process's view of it. `done` and `keep_going`
        as for the local executor."""
        root = self.cache_root or str(cache.root)
        refs: dict[str, Any] = {}
        outcome = Outcome({})
        for stage in plan.stages:
            earlier = reuse(stage, done)
            if earlier is not None:
                outcome.runs[stage.id] = earlier
                refs[stage.id] = {"id": stage.id, "key": stage.key}
                continue
            deps = [refs[a] for a in sorted(nx.ancestors(plan.graph, stage.id))]
            options = {"num_cpus": 1, "memory": stage_memory_bytes(plan, stage.id) or None,
                       "name": f"recipec:{stage.id}", "scheduling_strategy": "SPREAD"}
            refs[stage.id] = self._stage.options(**{k: v for k, v in options.items() if v}).remote(
                plan, stage.id, root, device, force, *deps)
        return self._collect(plan, cache, {k: v for k, v in refs.items() if k not in outcome.runs}, keep_going,
                             outcome)

    def _collect(self, plan: Plan, cache: StageCache, refs: dict[str, Any], keep_going: bool,
                 outcome: Outcome) -> Outcome:
        for stage_id, ref in refs.items():
            try:
                done = task_result(self.ray, ref, "a stage task", self.address)
            except PassError as exc:
                if not keep_going:
                    raise
                outcome.failures[stage_id] = StageFailure(stage_id, str(exc))
                continue
            entry = cache.lookup(done["key"])
            if entry is None:
                raise PassError(f"stage {stage_id!r} finished on node {done['node']} but its cache entry is not "
                                f"visible here ({cache.root}): the Ray cluster's nodes must share the stage cache "
                                "(a shared path, or RECIPEC_CACHE=s3://...)")
            outcome.runs[stage_id] = StageRun(plan.stage(stage_id), entry, done["cached"], done["seconds"],
                                              node=done["node"])
        return outcome

    def server(self, plan: Plan, cache: StageCache) -> "RayServing":
        return RayServing(self, plan, self.cache_root or str(cache.root))

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def task_result(ray, ref, what: str, address: str | None):
    """A task's return value; its failure as a PassError: a recipec error as it was raised on the worker,
    anything else named with `what`, and a lost cluster said as such (finished entries stay cached)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, RecipecError):
            raise PassError(str(cause)) from None
        raise PassError(f"{what} failed: {one_line(cause or exc)}") from None
    except (ray.exceptions.RaySystemError, ray.exceptions.WorkerCrashedError, ConnectionError) as exc:
        raise PassError(f"lost the Ray cluster at {address or 'the local instance'} ({one_line(exc)}); "
                        "finished stages stay in the cache: rerun the build to reuse them") from None


FORWARDED = ("AWS_", "RECIPEC_", "HF_", "TRANSFORMERS_OFFLINE", "GOOGLE_APPLICATION_CREDENTIALS")


def forwarded_environment() -> dict[str, str]:
    """What the build's workers must see as the driver does: the stage cache's endpoint and credentials
    (AWS_*), recipec's settings (the cache's local mirror, lease term) and the offline switches. A cluster whose
    nodes have their own credentials (an IAM role) needs none of it; this makes one without them work too."""
    import os

    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED) and k != "RECIPEC_EXECUTOR"}


def _probe(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens at: ray.init retries an unreachable GCS for minutes."""
    import socket

    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise PassError(f"cannot reach the Ray cluster at {address}: {exc} (is `ray start --head` running "
                        "there? RAY_ADDRESS / --ray-address name its GCS address, host:port)") from None


def _stage_task(plan: Plan, stage_id: str, cache_root: str, device: str, force: bool, *ancestors: dict):
    """One stage on a Ray worker: its ancestors' entries come from the shared cache (downloaded into this
    node's mirror when the cache is a URL); the stage then runs exactly as it would locally."""
    import ray

    cache = StageCache(cache_root, warn=console.warn)
    runs: dict[str, StageRun] = {}
    for done in ancestors:
        entry = cache.lookup(done["key"])
        if entry is None:
            raise PassError(f"stage {done['id']!r}'s entry {done['key'][:12]} is not in the cache at {cache_root} "
                            f"as seen from node {ray.get_runtime_context().get_node_id()[:12]}")
        runs[done["id"]] = StageRun(plan.stage(done["id"]), entry, True, 0.0)
    run = run_stage(plan, plan.stage(stage_id), runs, cache, device, force)
    return {"id": stage_id, "key": run.stage.key, "cached": run.cached, "seconds": run.seconds,
            "node": f"{ray.get_runtime_context().get_node_id()[:12]} ({hostname()})"}


class RayServing:
    """Serving measurements as Ray tasks, each holding a whole node (every CPU of it, and its GPU under
    CUDA) so that two measurements never share cores; the variant's directory is read from the shared
    cache by its stage key on that node, and the node's own hardware peaks come back with the runs."""

    def __init__(self, executor: RayExecutor, plan: Plan, cache_root: str):
        self.ray, self.plan, self.cache_root, self.address = executor.ray, plan, cache_root, executor.address
        self._serve = self.ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False)(_serve_task)
        self._next = 0

    def submit(self, variant: str, stage_key: str, device: str, runs: list[dict[str, Any]], threads: int,
               allowed: bool):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self._pick_node()
        return self._serve.options(
            num_cpus=node["cpus"], num_gpus=1 if device == "cuda" else 0, name=f"recipec:serve:{variant}",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["id"], soft=False),
        ).remote(variant, stage_key, self.cache_root, device, runs, threads, allowed)

    def result(self, ref) -> dict[str, Any]:
        return task_result(self.ray, ref, "a serving task", self.address)

    def _pick_node(self) -> dict[str, Any]:
        """Nodes in turn, so that concurrent measurements land on different nodes."""
        nodes = sorted(({"id": n["NodeID"], "cpus": int(n["Resources"].get("CPU", 1))} for n in self.ray.nodes()
                        if n.get("Alive") and n["Resources"].get("CPU")), key=lambda n: n["id"])
        if not nodes:
            raise PassError("the Ray cluster has no alive node with CPUs to profile on")
        node = nodes[self._next % len(nodes)]
        self._next += 1
        return node


def _serve_task(variant: str, stage_key: str, cache_root: str, device: str, runs: list[dict[str, Any]],
                threads: int, allowed: bool) -> dict[str, Any]:
    import ray

    from recipec.profile.profiler import serve_isolated

    cache = StageCache(cache_root, warn=console.warn)
    entry = cache.lookup(stage_key)
    if entry is None:
        raise PassError(f"variant {variant}: its entry {stage_key[:12]} is not in the cache at {cache_root}")
    started = time.time()
    raw = serve_isolated(Path(entry.output), device, runs, threads, lambda s: None, allowed)
    raw["node"] = f"{ray.get_runtime_context().get_node_id()[:12]} ({hostname()})"
    raw["hardware"] = node_hardware(device)
    raw["served_seconds"] = time.time() - started
    return raw


@functools.lru_cache(maxsize=None)
def node_hardware(device: str) -> dict[str, Any]:
    """This node's peaks, measured once per worker process (Ray reuses workers): a measurement takes seconds
    and a build measures many variants on the same node."""
    from recipec.profile.hardware import hardware_info

    return hardware_info(device)
