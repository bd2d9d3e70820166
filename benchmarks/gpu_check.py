"""The GPU check in one run: exactness on the device, the comparison with TRL, how cost grows.

    bash benchmarks/gpu_check.sh [OUT_DIR]            # on a one-GPU machine, under 8 minutes
    bash benchmarks/gpu_check.sh OUT_DIR --dry-run    # CPU, tiny sizes, well under a minute

Phases (each a subprocess with its own time limit, so one failure does not hide the rest; on the
GPU one after the other, the results file rewritten after each; in the dry mode side by side):

1. ``exactness``: ``gpu_exactness.py`` - every fast layout and attention mode (FlexAttention,
   segmented sdpa, dense mask) equals the padded path's log-probs and gradients, fp32 and bf16.
2. ``bench``: ``bench_vs_trl.py`` - TRL DPO (bf16 autocast, precomputed reference, no gradient
   checkpointing) against our DPO (the same precision scheme) at the 1B, 135M and 360M shapes,
   random weights: pairs/s, step memory (CUDA peak minus the memory after the first optimizer
   step), MFU.
3. ``bench-gc``: TRL DPO with its default gradient checkpointing at the 1B shape (its lower-memory
   setting), into the same table.
4. ``scaling``: ``scaling.py`` - one DPO micro-step of the padded and the fast path while the
   prompt length, the completion length and the batch grow, at the 360M shape.

Writes ``gpu_check.json`` (everything, with the environment and each phase's status and time),
``gpu_check.md`` (the tables) and ``gpu_scaling.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(dry: bool, work: Path, out: Path) -> list[tuple[str, list[str], float]]:
    """(phase, the script it runs and its arguments, seconds allowed) in order."""
    exactness = ["gpu_exactness.py", "--out", str(work / "exactness.json")]
    bench = ["bench_vs_trl.py", "--workdir", str(work / "bench"), "--out", str(work / "vs_trl.json")]
    scaling = ["scaling.py", "--out", str(work / "scaling.json"), "--plot", str(out / "gpu_scaling.png")]
    if dry:
        bench += (
            "--device cpu --precision mixed --threads 1 --tiny-batch 2 --tiny-warmup 1 --tiny-steps 2 "
            "--prompt-range 4 12 --completion-range 3 10 --timeout 120 --sizes micro --runs trl-dpo mmpo-dpo"
        ).split()
        return [
            ("exactness", exactness + "--device cpu --objectives dpo --precisions bf16".split(), 120),
            ("bench", bench, 180),
            ("scaling", scaling + "--device cpu --size micro --sweeps dry --repeats 1".split(), 120),
        ]
    bench += "--device cuda --batch 8 --warmup 3 --steps 10 --timeout 150".split()
    return [
        ("exactness", exactness + ["--device", "cuda"], 150),
        ("bench", bench + "--sizes 1b 135m 360m --runs trl-dpo mmpo-dpo".split(), 330),
        ("bench-gc", bench + "--sizes 1b --runs trl-dpo-gc --merge".split(), 90),
        ("scaling", scaling + "--device cuda --size 360m --sweeps gpu".split(), 150),
    ]


def environment(device: str) -> dict:
    import torch

    env = {"device": device, "python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "peft", "datasets", "liger-kernel", "triton"):
        try:
            env[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name.replace("-", "_")] = None
    if device == "cuda":
        from flops import card_peak

        env["gpu"] = torch.cuda.get_device_name()
        env["card_peak_bf16_flops"] = card_peak(env["gpu"])
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        env["measured_bf16_matmul_flops"] = 10 * 2 * 8192**3 / (time.perf_counter() - started)
        del a
        torch.cuda.empty_cache()  # the phases' processes measure their own memory: leave them the card
    return env


def start_phase(arguments: list[str], capture: bool) -> tuple[subprocess.Popen, float]:
    """Start a phase in its own process group (so a time-out ends its children too); its output
    goes straight to ours, or is captured (phases running side by side) and printed at its end."""
    if not capture:
        print(f"=== {' '.join(arguments)}", flush=True)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / arguments[0]), *arguments[1:]],
        cwd=HERE.parent,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        start_new_session=True,
    )
    return proc, time.perf_counter()


def finish_phase(name: str, arguments: list[str], started: tuple[subprocess.Popen, float], seconds: float) -> dict:
    """Wait for a phase (at most ``seconds`` since it started), print its output, say how it ended."""
    proc, began = started
    try:
        output, _ = proc.communicate(timeout=max(1.0, seconds - (time.perf_counter() - began)))
        status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the phase's process group: it and the runs it started
        output, _ = proc.communicate()
        status = f"timed out after {seconds:.0f} s"
    print(f"=== {name}: {' '.join(arguments)} ({status})" + (f"\n{output}" if output else ""), flush=True)
    return {"phase": name, "status": status, "seconds": round(time.perf_counter() - began, 1)}


def collect(work: Path) -> dict:
    found = {}
    for key, file in (("exactness", "exactness.json"), ("vs_trl", "vs_trl.json"), ("scaling", "scaling.json")):
        if (work / file).is_file():
            found[key] = json.loads((work / file).read_text())
    return found


def markdown(report: dict) -> str:
    from bench_report import format_table, loss_agreement

    env = report["environment"]
    lines = [
        f"# GPU check ({'dry run, CPU' if report['dry_run'] else env.get('gpu', env['device'])})",
        "",
        f"Command: `{report['command']}`; commit {report['commit']}; torch {env['torch']}, transformers "
        f"{env['transformers']}, TRL {env['trl']}, liger-kernel {env['liger_kernel']}; {report['seconds']:.0f} s.",
        "",
    ]
    if env.get("measured_bf16_matmul_flops"):
        lines += [
            f"bf16 matmul (8192^3): {env['measured_bf16_matmul_flops'] / 1e12:.0f} TFLOP/s measured; "
            f"MFU is against the card's {(env['card_peak_bf16_flops'] or 0) / 1e12:.0f} TFLOP/s peak.",
            "",
        ]
    lines += ["| phase | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {p['phase']} | {p['status']} | {p['seconds']:.0f} |" for p in report["phases"]]
    exact = report["results"].get("exactness")
    if exact:
        failed = [r for r in exact["rows"] if not r["ok"]]
        lines += [
            "",
            "## Exactness against the padded path",
            "",
            f"{len(exact['rows']) - len(failed)} of {len(exact['rows'])} cases pass; the forward pass picks "
            f"`{exact['automatic_choice']}` attention on {exact['device']} (candidates {exact['candidates']}).",
            "",
            "| precision | attention | cases | worst log-prob error | worst gradient error |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        groups: dict[tuple, list] = {}
        for row in exact["rows"]:
            groups.setdefault((row["precision"], row["attention"]), []).append(row)
        for (precision, mode), rows in groups.items():
            logps = max((r.get("logps_error", float("nan")) for r in rows), default=float("nan"))
            grads = [r["grad_error"] for r in rows if "grad_error" in r]
            lines.append(
                f"| {precision} | {mode} | {len(rows)} | {logps:.1e} | "
                f"{f'{max(grads):.1e}' if grads else 'forward only'} |"
            )
        lines += [
            f"- FAILED {r['precision']} {r['objective']} {r['attention']} {r['layout']}: "
            f"{r.get('error') or {k: v for k, v in r.items() if k.endswith('error')}}"
            for r in failed
        ]
    bench = report["results"].get("vs_trl")
    if bench and bench["results"]:
        lines += ["", "## Side by side with TRL", "", format_table(bench["results"]), ""]
        lines += [f"- {note}" for note in loss_agreement(bench["results"])]
        lines += [
            f"- {r['size']} {r['run']}: attention {r['attention']}"
            + "".join(f"; {mode} refused: {why}" for mode, why in r.get("attention_refused", {}).items())
            for r in bench["results"]
            if "attention" in r
        ]
    if bench and bench.get("failures"):
        lines += ["", "Runs that failed:", ""]
        lines += [
            f"- {f['size']} {f['run']}: {f['error'].splitlines()[-1] if f['error'] else ''}" for f in bench["failures"]
        ]
    scaling = report["results"].get("scaling")
    if scaling:
        lines += [
            "",
            f"## How the cost grows ({scaling['size']} shape, {scaling['device']})",
            "",
            "| axis | value | padded s | fast s | speed-up | padded MiB | fast MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for axis, rows in scaling["sweeps"].items():
            for row in rows:
                padded, fast = (v for k, v in row.items() if k != axis)
                lines.append(
                    f"| {axis} | {row[axis]} | {padded['seconds']:.3f} | {fast['seconds']:.3f} | "
                    f"{padded['seconds'] / fast['seconds']:.2f}x | {padded['memory_bytes'] / 2**20:.0f} | "
                    f"{fast['memory_bytes'] / 2**20:.0f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    parser.add_argument("--skip", nargs="*", default=[], help="phases to leave out")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all phases together")
    args = parser.parse_args(argv)
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    if not args.dry_run and dry:
        print("no CUDA device: running the dry mode (CPU, tiny sizes)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mmpo-gpu-check-"))
    started = time.perf_counter()
    from bench_report import git_commit

    report = {
        "command": " ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_commit(),
        "dry_run": dry,
        "environment": environment("cpu" if dry else "cuda"),
        "phases": [],
        "results": {},
    }
    phases = [(name, arguments, seconds) for name, arguments, seconds in plan(dry, work, out) if name not in args.skip]
    report["phases"] = [{"phase": name, "status": "skipped", "seconds": 0.0} for name in args.skip]
    if dry:  # CPU only and small: the phases run side by side (on a GPU, one at a time: they measure it)
        running = [(name, arguments, start_phase(arguments, True), seconds) for name, arguments, seconds in phases]
        report["phases"] += [finish_phase(name, arguments, proc, seconds) for name, arguments, proc, seconds in running]
    for name, arguments, seconds in [] if dry else phases:
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            report["phases"].append({"phase": name, "status": "skipped (time budget spent)", "seconds": 0.0})
            continue
        report["phases"].append(finish_phase(name, arguments, start_phase(arguments, False), min(seconds, left)))
        report["results"], report["seconds"] = collect(work), time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    report["results"] = collect(work)
    report["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return 0 if all(p["status"] in ("ok", "skipped") for p in report["phases"]) else 1  # budget skips fail


if __name__ == "__main__":
    raise SystemExit(main())
