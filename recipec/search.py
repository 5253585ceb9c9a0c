"""A searching build: run trials, measure each, keep the best; then stage out/<name>/ as `workflow.build` does.

Grid runs every planned trial: they are stages of one DAG, shared prefixes built once. Random and TPE ask
Optuna for one trial at a time and tell it what was measured (ask/tell), so each choice sees the results
before it; a trial Optuna proposes again is told its earlier result without being rebuilt. Every trial goes
through the stage cache, so a stage two trials share is built once. A trial that breaks a quality (or size)
constraint is not served: the report says "pruned by constraint". The budget (max_trials, max_minutes) is
respected and the report lists what was not tried.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from recipec.build.cache import StageCache
from recipec.build.outdir import recover_interrupted, remove_path, staging_dir, swap_into_place
from recipec.build.executor import Outcome
from recipec.build.stages import StageRun
from recipec.core import console
from recipec.core.builddir import VARIANTS
from recipec.core.diskspace import require_free, tree_bytes
from recipec.errors import PassError
from recipec.onnx.sessions import resolve_device
from recipec.plan.keys import assign_keys
from recipec.plan.planner import build_plan
from recipec.plan.search import SearchSpace, Trial, concrete_id
from recipec.plan.stages import SOURCE, Plan
from recipec.profile.search import COST, before_serving, check_constraints, objective_of, objective_value, search_block
from recipec.workflow import BuildOptions, BuildResult, assemble, open_executor

COST_HARDWARE = "H100 SXM 80GB"  # the cost objective's hardware row unless it names one
MAX_ASKS_PER_TRIAL = 20  # Optuna may propose a tried trial again; this bounds the asking in a small space


@dataclass
class TrialLog:
    trials: list[dict[str, Any]] = field(default_factory=list)  # {"variant", "params", "pruned"} in run order
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> its report entry
    values: dict[Trial, float | None] = field(default_factory=dict)  # every trial tried: its objective
    good: list[Trial] = field(default_factory=list)  # the trials that built and were measured


class SearchRun:
    """The state one searching build carries: the executor, the stage runs by cache key, the profiler, the
    trial log."""

    def __init__(self, plan: Plan, options: BuildOptions, device: str):
        self.plan, self.options, self.device = plan, options, device
        self.profiler: Any = None  # a profile.variants.VariantProfiler once the source model is built
        self.space: SearchSpace = plan.search
        self.cache = StageCache(options.cache_root, warn=console.warn)
        self.executor = open_executor(options, self.cache)
        self.done: dict[str, StageRun] = {}  # by cache key: what this build has already run
        self.log = TrialLog()
        self.started = time.monotonic()

    def run_plan(self, plan: Plan, keep_going: bool = False) -> Outcome:
        """The plan's stages through the executor; a stage an earlier trial ran is reused, not even re-verified."""
        outcome = self.executor.run(plan, self.cache, self.device, self.options.force, keep_going, self.done)
        self.done.update({run.stage.key: run for run in outcome.runs.values()})
        return outcome

    def plan_for(self, trials: list[Trial]) -> Plan:
        plan = build_plan(self.plan.recipe, with_keys=False, trials=trials)
        assign_keys(plan)
        return plan

    def measure(self, plan: Plan, runs: dict[str, StageRun]) -> None:
        """Profile every variant of `plan` not measured yet (the shared ones: baseline, unsearched passes)."""
        todo = {v: (runs[s].entry.output, runs[s].stage.key) for v, s in plan.variants.items()
                if v not in self.log.measured}
        self.log.measured.update(self.profiler.measure_many(todo))

    def evaluate(self, trials: list[Trial]) -> None:
        """Build and measure trials together: their stages run as the executor allows (side by side on a Ray
        cluster), then each variant is measured. A trial whose stage or profile fails is recorded with the error
        and the search goes on: one bad choice (a quantize that misses its own bound) must not end the others."""
        plan = self.plan_for(trials)
        outcome = self.run_plan(plan, keep_going=True)
        ready: dict[str, tuple[Trial, dict[str, Any]]] = {}
        for trial in trials:
            variant = concrete_id(trial.template, trial.assignment)
            record = {"variant": variant, "params": trial.params, "pruned": None, "error": None}
            self.log.trials.append(record)
            self.log.values[trial] = None
            failure = outcome.failures.get(plan.variants.get(variant, ""))
            if failure is not None:
                self._failed(record, failure.message)
            else:
                ready[variant] = (trial, record)
        spec = self.space.spec
        early = before_serving(spec["constraints"])
        gate = (lambda variant, entry: _broken(variant, entry, early, spec["concurrency"])) if early else None
        stage_of = {v: outcome.runs[plan.variants[v]] for v in ready}
        entries = self.profiler.measure_many({v: (r.entry.output, r.stage.key) for v, r in stage_of.items()},
                                             gate, keep_going=True)
        for variant, (trial, record) in ready.items():
            self._record(trial, record, entries[variant])

    def _failed(self, record: dict[str, Any], message: str) -> None:
        console.warn(f"search: trial {record['variant']} failed: {message}")
        record["error"] = message

    def _record(self, trial: Trial, record: dict[str, Any], entry: Any) -> None:
        if isinstance(entry, PassError):
            self._failed(record, str(entry))
            return
        variant = record["variant"]
        self.log.measured[variant] = entry
        self.log.good.append(trial)
        record["pruned"] = entry.get("pruned")
        if not record["pruned"]:
            cost_of = (_cost_of(self.profiler.projections({variant: entry}), self)
                       if objective_of(self.space.spec)[0] == COST else None)  # only a cost objective reads them
            self.log.values[trial] = objective_value(variant, entry, self.space.spec, cost_of)[0]

    def out_of_time(self) -> bool:
        limit = self.space.spec.get("max_minutes")
        return limit is not None and time.monotonic() - self.started > limit * 60


def _broken(variant: str, entry: dict[str, Any], constraints, concurrency: int) -> str | None:
    failed = [r for r in check_constraints(variant, entry, constraints, concurrency) if not r["passed"]]
    return "; ".join(f"pruned by constraint {r['metric']}: {r['reason']}" for r in failed) or None


def run_grid(search: SearchRun) -> list[Trial]:
    """The planned trials in waves: all of them at once under Ray (the DAG shares their prefixes; the cluster
    runs their branches side by side), one at a time locally so that max_minutes can stop between trials."""
    trials = search.space.planned()
    wave = len(trials) if search.executor.name == "ray" else 1
    for start in range(0, len(trials), wave):
        if search.out_of_time():
            break
        batch = trials[start:start + wave]
        console.say(f"search: trials {start + 1}-{start + len(batch)} of {len(trials)}" if wave > 1 else
                    f"search: trial {start + 1} of {len(trials)}: "
                    f"{concrete_id(batch[0].template, batch[0].assignment)}")
        search.evaluate(batch)
    return list(search.log.values)


def run_sampled(search: SearchRun) -> list[Trial]:
    """Random or TPE: Optuna proposes, recipec builds and measures, Optuna is told, until the budget ends."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = search.space.spec
    _, direction = objective_of(spec)
    sampler = (optuna.samplers.RandomSampler(seed=spec["seed"]) if spec["strategy"] == "random" else
               optuna.samplers.TPESampler(seed=spec["seed"]))
    study = optuna.create_study(direction=direction, sampler=sampler)
    tried: list[Trial] = []
    size = search.space.size()
    asks = 0
    while (len(tried) < spec["max_trials"] and asks < MAX_ASKS_PER_TRIAL * spec["max_trials"]
           and (size is None or len(tried) < size) and not search.out_of_time()):
        asked = study.ask()
        asks += 1
        trial = suggest(asked, search.space)
        if trial not in search.log.values:
            console.say(f"search: trial {len(tried) + 1} of at most {spec['max_trials']}: "
                        f"{concrete_id(trial.template, trial.assignment)}")
            search.evaluate([trial])
            tried.append(trial)
        value = search.log.values[trial]
        study.tell(asked, value) if value is not None else study.tell(asked, state=optuna.trial.TrialState.FAIL)
    return tried


def suggest(asked, space: SearchSpace) -> Trial:
    """One trial from Optuna's define-by-run API: first which searched variant, then its dimensions."""
    templates = space.templates()
    names = sorted(templates)
    template = asked.suggest_categorical("variant", names) if len(names) > 1 else names[0]
    values = []
    for dim in templates[template]:
        if dim.choices is not None:
            value = asked.suggest_categorical(dim.name, list(dim.choices))
        elif dim.integer:
            value = asked.suggest_int(dim.name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            value = dim.value(asked.suggest_float(dim.name, dim.low, dim.high, step=None if dim.log else dim.step,
                                                  log=dim.log))
        values.append((dim.name, value))
    return Trial(template, tuple(values))


def build_search(plan: Plan, options: BuildOptions) -> BuildResult:
    from recipec.profile.variants import VariantProfiler

    for warning in plan.warnings:
        console.warn(warning)
    recipe = plan.recipe
    device = resolve_device(options.device or recipe.resolved["serving"]["device"])
    final = options.out_root / recipe.name
    recover_interrupted(final)
    search = SearchRun(plan, options, device)
    try:
        base = search.plan_for([])  # the stages no search reaches, baseline among them
        runs = search.run_plan(base).runs
        with VariantProfiler(recipe.resolved, runs[SOURCE].entry.output, recipe.base_dir, device,
                             search.executor.server(base, search.cache)) as profiler:
            search.profiler = profiler
            search.measure(base, runs)
            tried = run_grid(search) if search.space.strategy == "grid" else run_sampled(search)
            final_plan = search.plan_for(search.log.good)
            runs = search.run_plan(final_plan).runs
            rows = profiler.projections(search.log.measured)
            block = search_block(search.space.spec, search.log.trials, search.log.measured,
                                 not_tried(search.space, tried), cost_of=_cost_of(rows, search))
            return _stage_out(final_plan, runs, search, block, rows, final, options)
    finally:
        search.executor.close()


def _cost_of(rows: list[dict[str, Any]], search: SearchRun):
    """A variant's projected $ per million output tokens on the objective's hardware row at the recipe's SLO."""
    from recipec.profile.projections import cost_at_slo

    hardware = search.space.spec["objective"].get("hardware") or COST_HARDWARE
    slo = search.plan.recipe.resolved["serving"].get("slo") or {}

    def cost(variant: str) -> float | None:
        point = cost_at_slo(rows, hardware, slo, variant=variant)
        return point["usd_per_mtok"] if point else None
    return cost


def not_tried(space: SearchSpace, tried: list[Trial]) -> dict[str, Any]:
    size = space.size()
    left = [concrete_id(t.template, t.assignment) for t in space.all_grid() if t not in set(tried)] if size else []
    return {"space_size": size, "tried": len(tried),
            "count": None if size is None else size - len(tried), "variants": left[:50]}


def _stage_out(plan: Plan, runs: dict[str, StageRun], search: SearchRun, block: dict[str, Any],
               projections: list[dict[str, Any]], final, options: BuildOptions) -> BuildResult:
    variant_bytes = sum(tree_bytes(runs[s].entry.output) for s in plan.variants.values())
    require_free(options.out_root, variant_bytes, f"out/{plan.recipe.name}/")
    staging = staging_dir(options.out_root, plan.recipe.name)
    measured = {v: {**search.log.measured[v], "artifact": {**search.log.measured[v]["artifact"],
                                                           "path": f"{VARIANTS}/{v}"}} for v in plan.variants}
    try:
        report = assemble(plan, runs, staging, search.device, options.profile,
                          measured=measured, profiler=search.profiler, search=block,
                          projections=[r for r in projections if r["variant"] in measured])
        swap_into_place(staging, final)
    finally:
        remove_path(staging)
    return BuildResult(final, runs, report)
