"""Run a planned sweep on a Ray cluster: one Ray task per run, each running ``mmpo sweep run-one``.

    pip install "ray[default]"
    ray start --head   # or connect to an existing cluster (RAY_ADDRESS)
    python examples/ray/run_sweep.py configs/sweeps/smollm2-135m.yaml runs/smollm2-135m
    python examples/ray/run_sweep.py configs/sweeps/offline-study.yaml runs/offline-study --gpus-per-run 0 --cpus-per-run 1

Ray places the tasks (one GPU each by default); the sweep folder must be on storage every node
sees. Each round runs what the plan can configure now; with a tuning section, the next round
holds the next stage, then the experiments. Finished work is skipped, so rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import ray


@ray.remote
def run_one(sweep_dir: str, index: int) -> tuple[int, int]:
    """One run: train (or resume) and evaluate; returns (index, exit code)."""
    proc = subprocess.run(["mmpo", "sweep", "run-one", sweep_dir, "--index", str(index)])
    return index, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("sweep_dir")
    parser.add_argument("--gpus-per-run", type=float, default=1)
    parser.add_argument("--cpus-per-run", type=float, default=4)
    args = parser.parse_args()
    ray.init()
    task = run_one.options(num_gpus=args.gpus_per_run, num_cpus=args.cpus_per_run)
    failed: list[int] = []
    while True:
        subprocess.run(["mmpo", "sweep", "plan", "--config", args.config, "--out", args.sweep_dir], check=True)
        plan = json.loads((Path(args.sweep_dir) / "plan.json").read_text())
        results = ray.get([task.remote(args.sweep_dir, i) for i in range(len(plan["runs"]))])
        failed = [plan["runs"][i]["name"] for i, code in results if code != 0]
        if failed or not plan["waiting"]:
            break  # stop on failures (rerun to retry them), or when that round covered everything
    if failed:
        print(f"failed runs (rerun this script to retry): {', '.join(failed)}")
        return 1
    subprocess.run(["mmpo", "report", args.sweep_dir], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
