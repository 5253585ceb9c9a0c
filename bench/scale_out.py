"""A search built by the local executor and by Ray on a two-node cluster, on this machine, from empty caches.

    python bench/scale_out.py [--recipe bench/recipes/scale-out.yaml] [--out bench/results]

Both builds run the same recipe (a grid search) through the CLI, each from its own empty stage cache, so
every stage is built in both; the wall time of each `recipec build` is measured from outside. The Ray cluster
is two raylets on loopback (ray.cluster_utils.Cluster), each with half of this machine's cores: on one
machine the nodes share its cores and memory bandwidth, so this measures what the executor overlaps (one
stage's single-threaded work beside another's, profiling of one variant beside a build), not what N real
machines give. Writes <out>/<date>-<host>-scale-out.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(recipe: Path, work: Path, extra: list[str]) -> dict:
    env = {**os.environ, "RECIPEC_CACHE": str(work / "cache"), "RAY_DEDUP_LOGS": "0"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(work / "out"),
                           *extra], capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({' '.join(extra) or 'local'}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    name = recipe.stem if not (work / "out").exists() else next((work / "out").iterdir()).name
    manifest = json.loads((work / "out" / name / "manifest.json").read_text())
    nodes = sorted({s["node"] for s in manifest["stages"] if not s["cached"]})
    report = json.loads((work / "out" / name / "report.json").read_text())
    return {"seconds": round(seconds, 1), "stages_built": sum(not s["cached"] for s in manifest["stages"]),
            "nodes": nodes, "recommended": report["search"]["recommended"],
            "measured_on": sorted({v.get("node") or "driver" for v in report["variants"].values()})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "bench/recipes/scale-out.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    cores = os.cpu_count() or 2
    per_node = max(1, cores // 2)
    results = {"recipe": str(args.recipe.relative_to(ROOT)), "host": platform.node(), "cores": cores,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "load_avg_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="recipec-scale-out-") as tmp:
        results["local"] = build(args.recipe, Path(tmp) / "local", ["--executor", "local"])
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": per_node})
        cluster.add_node(num_cpus=per_node)
        cluster.wait_for_nodes()
        try:
            results["ray_2_nodes"] = build(args.recipe, Path(tmp) / "ray",
                                           ["--executor", "ray", "--ray-address", cluster.address])
        finally:
            cluster.shutdown()
    results["load_avg_at_end"] = os.getloadavg()
    results["speedup"] = round(results["local"]["seconds"] / results["ray_2_nodes"]["seconds"], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{dt.date.today().isoformat()}-{platform.node()}-scale-out.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print("| executor | wall s | stages built | nodes | recommended |\n|---|---|---|---|---|")
    for key in ("local", "ray_2_nodes"):
        r = results[key]
        print(f"| {key} | {r['seconds']} | {r['stages_built']} | {len(r['nodes'])} | {r['recommended']} |")
    print(f"speed-up {results['speedup']}x; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
