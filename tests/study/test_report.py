"""mmpo report on synthetic sweep folders: every table value equals what the result files say."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import yaml

from mmpo.study import collect, write_report

GRID = {  # (objective, variant) -> betas, seeds
    ("mmpo", ""): ([0.01, 0.1, 0.5], [1, 2, 3]),
    ("dpo", ""): ([0.1, 0.5], [1, 2]),
    ("simpo", ""): ([2.0], [1]),
    ("mmpo", "no aux loss"): ([0.01, 0.1], [1, 2]),  # an ablation also run over a beta grid
    ("mmpo", "length-normalized"): ([0.01], [1]),
}
EPOCHS = 3
STEPS_PER_EPOCH = 4


def make_sweep(root: Path, *, seed: int = 0, length_controlled: bool = True, task_accuracy: bool = False) -> Path:
    """A sweep folder as `mmpo sweep` leaves it, with random numbers in every result file."""
    rng = random.Random(seed)
    runs = []
    for (objective, variant), (betas, seeds) in GRID.items():
        for beta in betas:
            for s in seeds:
                name = f"{objective}-beta{beta:g}-seed{s}" + (f"-{variant.replace(' ', '-')}" if variant else "")
                run_dir = root / "runs" / name
                config = {
                    "objective": objective,
                    "beta": beta,
                    "learning_rate": 5e-4,
                    "seed": s,
                    "aux_loss": variant != "no aux loss",
                    "output_dir": str(run_dir),
                }
                runs.append(
                    {
                        "name": name,
                        "kind": "train",
                        "evaluate": True,
                        "eval": {},
                        "model": None,
                        "config": config,
                        "roles": [
                            {
                                "kind": "experiment",
                                "block": "ablations" if variant else "main",
                                "variant": variant,
                                "objective": objective,
                            }
                        ],
                    }
                )
                run_dir.mkdir(parents=True)
                (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
                metrics = []
                for step in range(1, EPOCHS * STEPS_PER_EPOCH + 1):
                    metrics.append({"step": step, "loss": rng.uniform(0.1, 1.0), "rewards/accuracies": rng.random()})
                    if step % STEPS_PER_EPOCH == 0:
                        metrics.append(
                            {
                                "step": step,
                                "epoch": step / STEPS_PER_EPOCH,
                                "eval_rewards/accuracies": rng.random(),
                                "eval_loss": rng.random(),
                            }
                        )
                (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
                for epoch in range(1, EPOCHS + 1):
                    ckpt = run_dir / "checkpoints" / f"epoch-{epoch}"
                    (ckpt / "eval").mkdir(parents=True)
                    (ckpt / "trainer_state.json").write_text(
                        json.dumps({"global_step": epoch * STEPS_PER_EPOCH, "epoch": float(epoch)})
                    )
                    winrate = {"win_rate": rng.uniform(20, 80), "standard_error": rng.uniform(1, 3)}
                    if length_controlled:
                        winrate.update(
                            length_controlled_winrate=rng.uniform(20, 80), lc_standard_error_delta_method=1.0
                        )
                    if task_accuracy:  # what the programmatic judge adds: verifier-checked answers
                        winrate["correct_rate"] = {"model": rng.random(), "baseline": 0.25}
                    results = {"winrate": winrate, "harness": {"average_acc": rng.uniform(0.3, 0.5)}}
                    if not (objective == "dpo" and epoch == 2):  # the report falls back to metrics.jsonl
                        results["rewards"] = {"reward_accuracy": rng.random()}
                    (ckpt / "eval" / "results.json").write_text(json.dumps(results))
    (root / "plan.json").write_text(json.dumps({"name": "synthetic", "runs": runs, "waiting": []}))
    (root / "events.jsonl").write_text(
        json.dumps({"time": 1000.0, "event": "train_start"})
        + "\n"
        + json.dumps({"time": 1000.0 + 42 * 60, "event": "eval_done"})
        + "\n"
    )
    (root / "baselines" / "baseline-0").mkdir(parents=True)
    (root / "baselines" / "baseline-0" / "results.json").write_text(json.dumps({"harness": {"average_acc": 0.4}}))
    (root / "tuning.json").write_text(
        json.dumps(
            [
                {
                    "stage": 1,
                    "objective": "mmpo",
                    "keys": ["learning_rate"],
                    "candidates": [
                        {"run": "a", "values": {"learning_rate": 1e-4}, "reward_accuracy": 0.6},
                        {"run": "b", "values": {"learning_rate": 5e-4}, "reward_accuracy": 0.7},
                    ],
                    "selected": {"learning_rate": 5e-4},
                }
            ]
        )
    )
    return root


def read_points(root: Path, length_controlled: bool = True) -> list[dict]:
    """The numbers straight from the files, independently of mmpo.study."""
    plan = json.loads((root / "plan.json").read_text())
    points = []
    for run in plan["runs"]:
        cfg, variant = run["config"], run["roles"][0]["variant"]
        method = {"mmpo": "MMPO", "dpo": "DPO", "simpo": "SimPO"}[cfg["objective"]] + (
            f" ({variant})" if variant else ""
        )
        run_dir = Path(cfg["output_dir"])
        evals = {
            m["step"]: m["eval_rewards/accuracies"]
            for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in m
        }
        for epoch in range(1, EPOCHS + 1):
            results = json.loads((run_dir / "checkpoints" / f"epoch-{epoch}" / "eval" / "results.json").read_text())
            win = results["winrate"]["length_controlled_winrate" if length_controlled else "win_rate"]
            reward = results.get("rewards", {}).get("reward_accuracy", evals[epoch * STEPS_PER_EPOCH])
            points.append(
                {
                    "method": method,
                    "beta": cfg["beta"],
                    "seed": cfg["seed"],
                    "epoch": float(epoch),
                    "win": win,
                    "acc": results["harness"]["average_acc"],
                    "reward": reward,
                }
            )
    return points


def seed_mean(points, method, beta, epoch, key):
    return statistics.fmean(p[key] for p in points if (p["method"], p["beta"], p["epoch"]) == (method, beta, epoch))


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture()
def sweep(tmp_path):
    return make_sweep(tmp_path / "sweep")


def test_pareto_tables_equal_the_result_files(sweep, tmp_path):
    report = write_report(sweep, tmp_path / "out")
    text = report.read_text()
    data = json.loads((report.parent / "report.json").read_text())
    points = read_points(sweep)
    table1 = table_rows(text, "## Table 1")
    table2 = table_rows(text, "## Table 2")
    assert [r[0] for r in table1] == [r[0] for r in table2] == ["MMPO", "DPO", "SimPO"]  # no ablations in them
    for method, row1, row2, json1, json2 in zip(
        ["MMPO", "DPO", "SimPO"], table1, table2, data["pareto"]["peak_lm_acc"], data["pareto"]["peak_win_rate"]
    ):
        settings = {(p["beta"], p["epoch"]) for p in points if p["method"] == method}
        best_acc = max(settings, key=lambda s: seed_mean(points, method, *s, "acc"))
        best_win = max(settings, key=lambda s: seed_mean(points, method, *s, "win"))
        assert json1["lm_acc"] == pytest.approx(seed_mean(points, method, *best_acc, "acc"), abs=1e-12)
        assert json1["win_rate"] == pytest.approx(seed_mean(points, method, *best_acc, "win"), abs=1e-12)
        assert (json1["beta"], json1["epoch"]) == best_acc
        assert json2["win_rate"] == pytest.approx(seed_mean(points, method, *best_win, "win"), abs=1e-12)
        assert json2["lm_acc"] == pytest.approx(seed_mean(points, method, *best_win, "acc"), abs=1e-12)
        # The Markdown shows the same numbers, rounded.
        assert row1[1] == f"{seed_mean(points, method, *best_acc, 'acc') * 100:.2f}"
        assert row1[2].split(" ± ")[0] == f"{seed_mean(points, method, *best_acc, 'win'):.1f}"
        assert row1[4:6] == [f"{best_acc[0]:g}", f"{best_acc[1]:g}"]
        raw = statistics.fmean(
            json.loads(Path(p).read_text())["winrate"]["win_rate"]
            for p in [
                c.results_file for c in collect(sweep).checkpoints if (c.method, c.beta, c.epoch) == (method, *best_acc)
            ]
        )
        assert row1[3] == f"{raw:.1f}"
        assert row2[1] == f"{seed_mean(points, method, *best_win, 'win'):.1f}"
        assert row2[3].split(" ± ")[0] == f"{seed_mean(points, method, *best_win, 'acc') * 100:.2f}"
    assert "LC win-rate" in text and "The SFT model's LM accuracy: 40.00%" in text


def test_sensitivity_seed_spread_and_ablation_numbers(sweep, tmp_path):
    report = write_report(sweep, tmp_path / "out")
    data = json.loads((report.parent / "report.json").read_text())
    points = read_points(sweep)
    for row in data["beta_sensitivity"]:
        method, epoch = row["method"], row["epoch"]
        betas = sorted({p["beta"] for p in points if p["method"] == method})
        wins = [seed_mean(points, method, b, epoch, "win") for b in betas]
        assert row["betas"] == betas
        if len(betas) > 1:
            assert row["win_rate_spread"] == pytest.approx(max(wins) - min(wins), abs=1e-12)
        else:
            assert row["win_rate_spread"] is None
        stds = [
            statistics.stdev([p["win"] for p in points if (p["method"], p["beta"], p["epoch"]) == (method, b, epoch)])
            for b in betas
            if len({p["seed"] for p in points if p["method"] == method and p["beta"] == b}) > 1
        ]
        assert row["win_rate_seed_std"] == (pytest.approx(statistics.fmean(stds), abs=1e-12) if stds else None)
    final = {(r["method"], r["beta"]): r for r in data["seed_spread"]}
    assert set(final) == {(p["method"], p["beta"]) for p in points}
    for (method, beta), row in final.items():
        values = sorted(p["reward"] for p in points if (p["method"], p["beta"], p["epoch"]) == (method, beta, EPOCHS))
        assert row["epoch"] == EPOCHS and sorted(row["reward_accuracy"]["values"]) == pytest.approx(values)
    # DPO epoch 2 has no 'rewards' in results.json: its reward accuracy is the training log's at that step.
    dpo = [r for r in collect(sweep).checkpoints if r.objective == "dpo" and r.epoch == 2]
    assert all(
        p.reward_accuracy
        == next(
            q["reward"]
            for q in points
            if q["method"] == "DPO" and q["beta"] == p.beta and q["seed"] == p.seed and q["epoch"] == 2.0
        )
        for p in dpo
    )
    assert [r["method"] for r in data["beta_sensitivity"]] == ["MMPO"] * 3 + ["DPO"] * 3 + ["MMPO (no aux loss)"] * 3
    ablations = {(r["method"], r["epoch"]): r for r in data["ablations"]}
    assert {m for m, _ in ablations} == {"MMPO", "MMPO (no aux loss)", "MMPO (length-normalized)"}
    assert {r["beta"] for r in data["ablations"]} == {0.01}  # the grid's beta=0.1 run is not an ablation point
    for epoch in range(1, EPOCHS + 1):  # the default run at the same beta and the same seeds (1, 2)
        expected = statistics.fmean(
            p["acc"]
            for p in points
            if p["method"] == "MMPO" and p["beta"] == 0.01 and p["seed"] in (1, 2) and p["epoch"] == epoch
        )
        assert ablations[("MMPO", float(epoch))]["lm_acc"]["mean"] == pytest.approx(expected, abs=1e-12)


def test_report_files_figures_and_html(sweep, tmp_path):
    report = write_report(sweep, tmp_path / "out", command="mmpo sweep --config x.yaml", notes="A *note*.")
    out = report.parent
    for name in (
        "winrate_vs_lm_accuracy.png",
        "raw_winrate_vs_lm_accuracy.png",
        "beta_sensitivity.png",
        "ablations.png",
        "training_curves.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report.read_text()
    text = report.read_text()
    assert text.index("mmpo sweep --config x.yaml") < text.index("## Table 1") and "A *note*." in text
    assert "Sweep wall time: 42 min" in text
    html = (out / "report.html").read_text()
    assert "<table>" in html and '<img src="winrate_vs_lm_accuracy.png"' in html and "<em>note</em>" in html
    rows = (out / "checkpoints.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(len(b) * len(s) for b, s in GRID.values()) * EPOCHS
    selection = table_rows(text, "## Hyper-parameter selection")
    assert selection[1][2:] == ["learning_rate=0.0005", "70.0", "**selected**"] and selection[0][4] == ""


def test_raw_win_rate_when_results_have_no_length_controlled_value(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", length_controlled=False)
    report = write_report(sweep, tmp_path / "out")
    data = json.loads((report.parent / "report.json").read_text())
    points = read_points(sweep, length_controlled=False)
    assert data["win_rate_metric"] == "win_rate" and "LC win-rate" not in report.read_text()
    top = data["pareto"]["peak_win_rate"][0]
    assert top["win_rate"] == pytest.approx(
        max(seed_mean(points, "MMPO", b, e, "win") for b in (0.01, 0.1, 0.5) for e in (1.0, 2.0, 3.0)), abs=1e-12
    )


def test_cli_report_and_a_folder_that_is_not_a_sweep(sweep, tmp_path, capsys):
    from mmpo.cli import main

    assert (
        main(["report", str(sweep), "--out", str(tmp_path / "o"), "--command", "mmpo sweep --config study.yaml"]) == 0
    )
    assert "mmpo sweep --config study.yaml" in (tmp_path / "o" / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "o")]) == 2
    assert "is not a sweep folder (no plan.json)" in " ".join(capsys.readouterr().err.split())


def test_task_accuracy_table_equals_the_result_files(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", task_accuracy=True)
    text = write_report(sweep, tmp_path / "out").read_text()
    assert "The starting model's task accuracy: 25.0%" in text
    plan = json.loads((sweep / "plan.json").read_text())
    by_setting: dict[tuple, list[float]] = {}
    for run in plan["runs"]:
        cfg, variant = run["config"], run["roles"][0]["variant"]
        method = {"mmpo": "MMPO", "dpo": "DPO", "simpo": "SimPO"}[cfg["objective"]] + (
            f" ({variant})" if variant else ""
        )
        for epoch in range(1, EPOCHS + 1):
            results_file = Path(cfg["output_dir"]) / "checkpoints" / f"epoch-{epoch}" / "eval" / "results.json"
            value = json.loads(results_file.read_text())["winrate"]["correct_rate"]["model"]
            by_setting.setdefault((method, f"{cfg['beta']:g}", f"{epoch:g}"), []).append(value)
    assert "![task accuracy vs LM accuracy](task_accuracy_vs_lm_accuracy.png)" in text
    figure = tmp_path / "out" / "task_accuracy_vs_lm_accuracy.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table_rows(text, "## Task accuracy")
    assert len(rows) == len(by_setting)
    for row in rows:
        values = by_setting[(row[0], row[1], row[2])]
        assert row[3].split(" ± ")[0] == f"{statistics.fmean(values) * 100:.1f}"
        assert row[7] == str(len(values))


def test_no_task_accuracy_section_without_verifier_results(sweep, tmp_path):
    assert "## Task accuracy" not in write_report(sweep, tmp_path / "out").read_text()
    assert not (tmp_path / "out" / "task_accuracy_vs_lm_accuracy.png").exists()
