"""Studies: the paper's comparison as a grid of independent, resumable runs, and its report.

The chain, one module per step: :mod:`~mmpo.study.spec` (the sweep YAML and its validation) ->
:mod:`~mmpo.study.plan` (grid expansion, run names, stage-wise tuning, plan files) ->
:mod:`~mmpo.study.execute` (locks, worker subprocesses, one run) with
:mod:`~mmpo.study.status` (what a run folder says is done) and :mod:`~mmpo.study.estimate` /
:mod:`~mmpo.study.preview` (steps and memory before anything runs); then
:mod:`~mmpo.study.results` (reading the folders, statistics) -> :mod:`~mmpo.study.figures` and
:mod:`~mmpo.study.render` (Markdown/HTML report). ``mmpo sweep`` and ``mmpo report`` call these.
"""

from mmpo.study.estimate import MemoryEstimate, count_rows, estimate_gpu_memory
from mmpo.study.execute import RunBusy, SweepOutcome, execute_run, run_locked, run_sweep
from mmpo.study.plan import Plan, PlannedRun, load_plan, make_plan, run_name, write_plan
from mmpo.study.preview import describe_run, plan_summary, plan_table
from mmpo.study.render import markdown_report, write_report
from mmpo.study.results import CheckpointResult, SweepResults, collect
from mmpo.study.spec import SweepConfig, load_sweep, sweep_from_dict
from mmpo.study.status import run_status, training_finished, validation_reward_accuracy

__all__ = [
    "CheckpointResult",
    "MemoryEstimate",
    "Plan",
    "PlannedRun",
    "RunBusy",
    "SweepConfig",
    "SweepOutcome",
    "SweepResults",
    "collect",
    "count_rows",
    "describe_run",
    "estimate_gpu_memory",
    "execute_run",
    "load_plan",
    "load_sweep",
    "make_plan",
    "markdown_report",
    "plan_summary",
    "plan_table",
    "run_locked",
    "run_name",
    "run_status",
    "run_sweep",
    "sweep_from_dict",
    "training_finished",
    "validation_reward_accuracy",
    "write_plan",
    "write_report",
]
