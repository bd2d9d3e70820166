"""What each ``mmpo`` command does with its parsed arguments: call the Python API, print the outcome.

The parsers are in :mod:`mmpo.cli`. Console output never reads user text (paths, run names, row
ids, judge names) as rich markup or emoji codes.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmpo.cli import ReportArgs, SweepArgs, SweepPlanArgs, SweepRunOneArgs, WorldBuildArgs


@functools.cache
def _console():
    """Console output never reads user text (paths, row ids, judge names) as markup or emoji codes."""
    from rich.console import Console

    return Console(stderr=True, markup=False, emoji=False, highlight=False)


def console():
    """The console errors and results are printed on (markup and emoji codes off)."""
    return _console()


def say(*objects: Any) -> None:
    _console().print(*objects)


def _bold(text: str):
    from rich.text import Text

    return Text(text, style="bold")


def _sparkline(values: list[float]) -> str:
    if not values:
        return ""
    blocks = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = max(1, len(values) // 60)
    return "".join(blocks[int((v - low) / span * (len(blocks) - 1))] for v in values[::step])


def _dry_run(cfg: Any) -> int:
    from mmpo.dry_run import plan, render
    from mmpo.training.setup import launched_processes

    print(render(plan(cfg, launched_processes())))
    return 0


def run_train(cfg: Any) -> int:
    from mmpo.training import train

    if cfg.dry_run:
        return _dry_run(cfg)
    s = train(cfg).summary
    _console().rule(_bold(f"{s['objective']} done: {s['steps']} steps"))
    if s.get("eval_reward_accuracy_after") is not None:
        before = s.get("eval_reward_accuracy_before")
        before_text = f"{before:.3f}" if before is not None else "n/a (resumed)"
        say(f"held-out reward accuracy: before {before_text} -> after {s['eval_reward_accuracy_after']:.3f}")
    losses = s.get("train_loss_curve", [])
    if losses:
        say(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}  {_sparkline(losses)}")
    say(f"model: {s['final_model']}\nmetrics: {s['metrics_file']}\nsummary: {s['output_dir']}/summary.json")
    return 0


def run_sft(cfg: Any) -> int:
    from mmpo.training import sft

    if cfg.dry_run:
        return _dry_run(cfg)
    result = sft(cfg)
    say(f"SFT done: {result.global_step} steps; model: {result.summary['final_checkpoint']}")
    return 0


def run_export(args: Any) -> int:
    from mmpo.publish.export import merge_lora, push_to_hub
    from mmpo.publish.model_card import invocation, write_model_card
    from mmpo.training.loop import final_model_dir

    source = Path(args.source)
    folder = final_model_dir(source) or source if source.is_dir() else source
    if args.merge_lora:
        out = Path(args.out or f"{source.resolve()}-merged")
        merge_lora(folder, out, base_model=args.base_model, dtype=args.dtype)
        saved = next(
            (p / "config.yaml" for p in (folder, folder.parent, folder.parent.parent) if (p / "config.yaml").is_file()),
            None,
        )
        if saved is not None:
            import yaml

            write_model_card(out, yaml.safe_load(saved.read_text()), command=invocation(), merged=True)
        say(f"merged model: {out}")
        folder = out
    if args.push_to_hub:
        info = push_to_hub(folder, args.push_to_hub, private=args.private)
        say(f"pushed {folder} to {args.push_to_hub}: {info.commit_url}")
    if not (args.merge_lora or args.push_to_hub):
        say("nothing to do: pass --merge-lora and/or --push-to-hub REPO")
        return 2
    return 0


def _fields_of(cls: type, args: Any) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run_model_import(args: Any) -> int:
    from mmpo.gguf_models import ModelImportOptions, import_gguf

    opts = _fields_of(ModelImportOptions, args)
    result = import_gguf(opts.source, opts.output_dir, dtype=opts.dtype, overwrite=opts.overwrite)
    say(f"imported {result.source} ({result.parameters:,} parameters) into {result.output_dir}")
    return 0


def run_pairs(args: Any) -> int:
    from mmpo.pairs import PairsOptions, make_pairs, report_lines

    result = make_pairs(_fields_of(PairsOptions, args), say=say)
    for line in report_lines(result.report):
        say(line)
    return 0


def run_eval(args: Any) -> int:
    from mmpo.evaluation.checkpoint_eval import EvalSettings, evaluate_checkpoint, summary_lines

    settings = EvalSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)})
    results = evaluate_checkpoint(args.checkpoint, settings, say=say)
    _console().rule(_bold("evaluation"))
    for line in summary_lines(results):
        say(line)
    return 0


def run_world_build(args: WorldBuildArgs) -> int:
    import json

    from mmpo.world.build import build_world, generate_world_data, output_folder

    if args.data_only:
        info = generate_world_data(output_folder(args.out, args.replace_packaged), args.seed)
    else:
        extra = {"sft_epochs": args.sft_epochs} if args.sft_epochs is not None else {}
        info = build_world(args.out, args.seed, replace_packaged=args.replace_packaged, **extra)
    print(json.dumps(info, indent=2))
    return 0


def run_sweep_plan(args: SweepPlanArgs, *, only_show: bool = False) -> int:
    from mmpo.study import describe_run, load_sweep, make_plan, plan_summary, plan_table, write_plan
    from mmpo.study.plan import COMMANDS_FILE, PLAN_FILE

    sweep = load_sweep(args.config, output_dir=args.out, set_values=args.set, grid_values=args.grid)
    sweep_dir = Path(sweep.output_dir)
    shown = make_plan(sweep, sweep_dir, provisional=True)
    rows = [describe_run(r, sweep_dir) for r in shown.runs]
    say(plan_table(rows))
    for line in plan_summary(rows, shown.waiting):
        say(line)
    if not only_show:
        plan = make_plan(sweep, sweep_dir)
        write_plan(plan, sweep)
        say(f"wrote {sweep_dir / PLAN_FILE} and {sweep_dir / COMMANDS_FILE} ({len(plan.runs)} commands)")
    return 0


def run_sweep(args: SweepArgs) -> int:
    from mmpo.study import load_sweep
    from mmpo.study import run_sweep as run

    if args.dry_run:
        return run_sweep_plan(args, only_show=True)
    sweep = load_sweep(args.config, output_dir=args.out, set_values=args.set, grid_values=args.grid)
    outcome = run(sweep, sweep_dir=sweep.output_dir, workers=args.workers, say=say)
    say(f"sweep {sweep.name}: {len(outcome.done)} entries done, {len(outcome.failed)} failed")
    for name, problem in outcome.failed.items():
        say(f"  failed: {name}: {problem}")
    for line in outcome.waiting:
        say(f"  waiting: {line}")
    say(f"report: mmpo report {sweep.output_dir}")
    return 1 if outcome.failed else 0


def run_sweep_one(args: SweepRunOneArgs) -> int:
    from mmpo.study import RunBusy, load_plan, run_locked

    plan = load_plan(args.sweep_dir)
    run = plan.find(name=args.name, index=args.index)
    try:
        run_locked(run, plan.sweep_dir, say)
    except RunBusy as err:
        say(str(err))
    return 0


def run_report(args: ReportArgs) -> int:
    from mmpo.study import write_report
    from mmpo.study.plan import SWEEP_FILE

    notes = Path(args.notes).read_text() if args.notes else None
    command = args.command or f"mmpo sweep --config {Path(args.sweep_dir) / SWEEP_FILE}\nmmpo report {args.sweep_dir}"
    path = write_report(args.sweep_dir, args.out, command=command, notes=notes)
    say(f"report: {path} (and report.html, report.json, checkpoints.csv, PNG figures in {path.parent})")
    return 0
