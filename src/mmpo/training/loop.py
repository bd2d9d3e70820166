"""The training loop on Accelerate, shared by preference training and SFT; read ``run`` top to bottom.

A recipe (``Recipe``) supplies the examples, a function that turns a micro-batch into a loss and
metrics, and an evaluation function; the loop does the rest: data order (``mmpo.data.order``),
accumulation, clipping, the schedule, skipped non-finite steps, metrics, checkpoints and resume.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import get_cosine_schedule_with_warmup

from mmpo.config import CommonConfig, ConfigError
from mmpo.data.order import step_micro_batches, training_order
from mmpo.publish.trainer_state import hf_trainer_state
from mmpo.training import checkpoint, run_lock
from mmpo.training.interrupt import StopOnSignal, TrainingInterrupted, resume_command
from mmpo.training.preflight import check_lora_targets, check_optional_packages
from mmpo.training.run_dir import (
    CONFIG_FILE,
    MODEL_DIR,
    STATE_DIR,
    TRAINER_STATE_FILE,
    LogWindow,
    MetricsLog,
    RunDir,
    trim_metrics,
    write_config,
)
from mmpo.training.setup import build_optimizer

MAX_CONSECUTIVE_NONFINITE = 10
C = TypeVar("C", bound=CommonConfig)
SCHEDULER_FILE = "mmpo_scheduler.pt"

#: A micro-batch step: (model, its examples, all examples of the optimizer step) -> (loss, per-example metrics, tokens).
MicroStep = Callable[[torch.nn.Module, list[dict], list[dict]], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps being NaN); the last good checkpoint is kept."""


@dataclass
class RunResult:
    output_dir: Path
    global_step: int
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


@dataclass
class Recipe:
    """What differs between preference training and SFT."""

    name: str
    train_examples: list[dict]
    micro_step: MicroStep
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None
    #: True when the recipe already ran ``check_resume_data`` right after loading the data.
    data_checked: bool = False


def prepare_run_dir(cfg: CommonConfig, accelerator: Accelerator) -> RunDir:
    """Checks that need neither data nor weights, then the run folder: locked, checked, config written."""
    check_optional_packages(cfg)
    check_lora_targets(cfg)
    run_dir = RunDir(cfg.output_dir)
    if accelerator.is_main_process:
        run_lock.acquire(run_dir.path, say=accelerator.print)  # held until run() ends (or the process exits)
    run_dir.check_start(cfg)
    if accelerator.is_main_process:
        run_dir.start(cfg)
    accelerator.wait_for_everyone()
    return run_dir


def check_resume_data(cfg: CommonConfig, accelerator: Accelerator, examples: list[dict]) -> None:
    """Refuse ``--resume`` on changed training data (unless ``resume_allow_data_change``); record the
    data of a fresh run. Cheap next to training; recipes call it right after loading the data."""
    global_batch = cfg.per_device_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    change = RunDir(cfg.output_dir).check_data(cfg, examples, global_batch, write=accelerator.is_main_process)
    if change:
        accelerator.print(f"--resume: the training data changed ({change}); going on with the new data as asked")
    accelerator.wait_for_everyone()


@contextmanager
def _quiet_saving():
    """Checkpoint writes print nothing over the progress bar: no "Writing model shards" bars, no
    warning that the tied LM head is stored once (it is reloaded correctly)."""
    from transformers.utils import logging as hf_logging

    accelerate_logger = logging.getLogger("accelerate.utils.other")
    level, bars = accelerate_logger.level, hf_logging.is_progress_bar_enabled()
    accelerate_logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        accelerate_logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def save_checkpoint(accelerator, model, tokenizer, cfg, name: str, trainer_state: dict, scheduler) -> Path | None:
    with _quiet_saving():
        return _save_checkpoint(accelerator, model, tokenizer, cfg, name, trainer_state, scheduler)


def _save_checkpoint(accelerator, model, tokenizer, cfg, name: str, trainer_state: dict, scheduler) -> Path | None:
    run_dir = Path(cfg.output_dir)
    staging = checkpoint.staging_dir(run_dir, name) if accelerator.is_main_process else None
    staging = Path(gather_object([str(staging)])[0]) if accelerator.num_processes > 1 else staging
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging / STATE_DIR), safe_serialization=True)
        accelerator.wait_for_everyone()  # every rank's RNG state file is written before the manifest
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), staging / STATE_DIR / SCHEDULER_FILE)
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(
                staging / MODEL_DIR, safe_serialization=True, state_dict=accelerator.get_state_dict(model)
            )
            tokenizer.save_pretrained(staging / MODEL_DIR)
            write_config(cfg, staging / CONFIG_FILE)
            final = checkpoint.finalize(staging, name, trainer_state)
        else:
            accelerator.get_state_dict(model)  # collective under ZeRO-3/FSDP: every rank must call it
            final = None
    except Exception as error:
        clear = checkpoint.write_error(error, name, Path(cfg.output_dir))  # before freeing the space
        if accelerator.is_main_process:
            checkpoint.discard(staging)  # a disk-full write would otherwise keep the disk full
        if clear is None:
            raise
        raise clear from error
    accelerator.wait_for_everyone()
    return final


def _resume(cfg, accelerator, run_dir: RunDir, scheduler, log: MetricsLog) -> dict:
    """Load the newest complete checkpoint (if any) and return its trainer state (``{}`` with none)."""
    if accelerator.is_main_process:
        checkpoint.recover(run_dir.path, log=accelerator.print)  # leftovers of a killed run
    accelerator.wait_for_everyone()
    found = checkpoint.latest_valid(run_dir.path, log=accelerator.print)
    state: dict = {}
    if found is not None:
        accelerator.load_state(str(found / STATE_DIR))
        scheduler.load_state_dict(torch.load(found / STATE_DIR / SCHEDULER_FILE, weights_only=True))
        state = checkpoint.read_trainer_state(found)
        state.update(state.get("stateful_callbacks", {}).get("mmpo", {}))  # nonfinite_steps, log_window
        accelerator.print(f"resumed from {found} at step {state['global_step']}")
    else:
        accelerator.print(f"--resume: no complete checkpoint in {run_dir.path}, starting from the beginning")
    # Records after the checkpoint (or all, with none) are logged again by this run: drop them.
    log.records = trim_metrics(run_dir.metrics, state.get("global_step", -1), write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return state


def run(cfg: CommonConfig, accelerator: Accelerator, model, tokenizer, recipe: Recipe) -> RunResult:
    try:
        with StopOnSignal() as stop:
            return _run(cfg, accelerator, model, tokenizer, recipe, stop)
    finally:
        if accelerator.is_main_process:
            run_lock.release(cfg.output_dir)


def _run(cfg: CommonConfig, accelerator: Accelerator, model, tokenizer, recipe: Recipe, stop: StopOnSignal):
    run_dir = RunDir(cfg.output_dir)
    examples = recipe.train_examples
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the global batch ({global_batch} examples) is larger than the training data "
            f"({len(examples)} examples): lower per_device_batch_size or gradient_accumulation_steps"
        )
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    if not recipe.data_checked:
        check_resume_data(cfg, accelerator, examples)

    optimizer = build_optimizer(cfg, model, accelerator)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    _configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)

    log = MetricsLog(run_dir.metrics, accelerator.is_main_process)
    resumed = _resume(cfg, accelerator, run_dir, scheduler, log) if cfg.resume else {}
    global_step = resumed.get("global_step", 0)

    if global_step == 0 and recipe.evaluate is not None:
        log.write({"step": 0, "epoch": 0.0, **recipe.evaluate(model)})

    progress = None
    if cfg.progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=global_step, desc=f"{recipe.name}", dynamic_ncols=True)

    nonfinite_total, nonfinite_run = resumed.get("nonfinite_steps", 0), 0
    run_start = time.perf_counter()
    window = LogWindow.restore(resumed.get("log_window"))
    model.train()
    order_epoch, order = -1, []
    while global_step < total_steps:
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        if epoch != order_epoch:  # once per epoch (also right after a mid-epoch resume)
            order_epoch = epoch
            order = training_order(
                examples, seed=cfg.seed, epoch=epoch, global_batch=global_batch, group_by_length=cfg.group_by_length
            )
        micro_batches, step_indices = step_micro_batches(
            order,
            step_in_epoch,
            per_device=cfg.per_device_batch_size,
            accumulation=cfg.gradient_accumulation_steps,
            world_size=world,
            rank=rank,
        )
        step_examples = [examples[i] for i in step_indices]
        step_metrics: dict[str, list[torch.Tensor]] = {}
        tokens = torch.zeros((), device=accelerator.device)
        loss_values = []
        for micro in micro_batches:
            with accelerator.accumulate(model):
                loss, metrics, num_tokens = recipe.micro_step(model, [examples[i] for i in micro], step_examples)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = _clip(accelerator, model, cfg.max_grad_norm)
                finite = (
                    _step_is_finite(accelerator, grad_norm, [*loss_values, loss.detach().float()])
                    if accelerator.sync_gradients
                    else True
                )
                if accelerator.sync_gradients and finite:
                    optimizer.step()
                if accelerator.sync_gradients:
                    optimizer.zero_grad(set_to_none=True)
            loss_values.append(loss.detach().float())
            tokens += num_tokens
            for key, value in metrics.items():
                step_metrics.setdefault(key, []).append(value)
        if not finite:
            nonfinite_total += 1
            nonfinite_run += 1
            ids = [examples[i].get("id") for i in step_indices]
            accelerator.print(
                f"step {global_step + 1}: non-finite loss or gradient, step skipped (examples {ids[:8]}...)"
            )
            log.write({"step": global_step + 1, "event": "nonfinite_step_skipped", "example_ids": ids})
            if nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                raise TrainingError(
                    f"{nonfinite_run} optimizer steps in a row had a non-finite loss or gradient; "
                    f"stopping before writing bad weights (last good checkpoint kept in {run_dir.path})"
                )
        else:
            nonfinite_run = 0
            scheduler.step()
        global_step += 1

        reduced = _mean_over_processes(accelerator, {k: torch.cat(v) for k, v in step_metrics.items()})
        reduced["loss"] = float(accelerator.reduce(torch.stack(loss_values).mean(), "mean"))
        reduced["grad_norm"] = float(grad_norm)
        window.add(reduced, int(accelerator.reduce(tokens, "sum")))
        if progress is not None:
            progress.update(1)
            shown = {"loss": f"{reduced['loss']:.4f}"}
            if "rewards/accuracies" in reduced:
                shown["acc"] = f"{reduced['rewards/accuracies']:.2f}"
            shown["tok/s"] = f"{window.tokens / window.seconds():.0f}"
            progress.set_postfix(shown, refresh=False)

        epoch_done = global_step % steps_per_epoch == 0
        if global_step % cfg.logging_steps == 0 or global_step == total_steps or epoch_done:
            record = {
                "step": global_step,
                "epoch": round(global_step / steps_per_epoch, 4),
                "learning_rate": scheduler.get_last_lr()[0],
                **window.means(),
                "tokens_per_second": window.tokens / window.seconds(),
                "nonfinite_steps": nonfinite_total,
            }
            log.write(record)
            accelerator.log(record, step=global_step)
            window = LogWindow()

        do_eval = recipe.evaluate is not None and (
            epoch_done or global_step == total_steps or (cfg.eval_steps and global_step % cfg.eval_steps == 0)
        )
        if do_eval:
            record = {"step": global_step, "epoch": round(global_step / steps_per_epoch, 4), **recipe.evaluate(model)}
            log.write(record)
            accelerator.log(record, step=global_step)
            model.train()

        saved = epoch_done or global_step == total_steps or (cfg.save_steps and global_step % cfg.save_steps == 0)
        signum = stop.requested(accelerator)
        if saved or signum:
            name = f"epoch-{global_step // steps_per_epoch}" if epoch_done else f"step-{global_step:07d}"
            state = hf_trainer_state(
                log.records,
                global_step=global_step,
                steps_per_epoch=steps_per_epoch,
                total_steps=total_steps,
                per_device_batch_size=cfg.per_device_batch_size,
                logging_steps=cfg.logging_steps,
                eval_steps=cfg.eval_steps,
                save_steps=cfg.save_steps,
                train_runtime=time.perf_counter() - run_start,
                global_batch_size=global_batch,
            )
            # What a resume needs beyond HF's fields, where HF's TrainerState keeps callbacks' state.
            mmpo_state = {"nonfinite_steps": nonfinite_total, "log_window": window.state()}
            state.setdefault("stateful_callbacks", {})["mmpo"] = mmpo_state
            final = save_checkpoint(accelerator, model, tokenizer, cfg, name, state, scheduler)
            if not epoch_done and accelerator.is_main_process:
                checkpoint.prune_step_checkpoints(run_dir.path, cfg.save_total_limit)
        if signum and global_step < total_steps:
            _stop_on_signal(cfg, accelerator, signum, global_step, final, progress)

    if progress is not None:
        progress.close()
    accelerator.end_training()
    return RunResult(output_dir=run_dir.path, global_step=global_step, metrics=log.records)


def _stop_on_signal(cfg, accelerator: Accelerator, signum: int, step: int, saved: Path | None, progress) -> None:
    """The checkpoint of ``step`` is written: say how to resume and stop (exit code 128 + signal)."""
    if progress is not None:
        progress.close()
    name = signal.Signals(signum).name
    message = (
        f"stopped by {name} after step {step}; checkpoint written: {saved or cfg.output_dir}\n"
        f"resume with: {resume_command(cfg, cfg.output_dir, accelerator.num_processes)}"
    )
    accelerator.print(message)
    accelerator.end_training()  # trackers are closed as at a normal end
    raise TrainingInterrupted(message, signum, saved)


def _mean_over_processes(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average each per-example metric over all examples on all processes (not just rank 0's)."""
    out = {}
    for key, tensor in values.items():
        flat = tensor.detach().float().reshape(-1).contiguous()
        gathered = accelerator.gather_for_metrics(flat, use_gather_object=False)
        out[key] = float(gathered.mean()) if gathered.numel() else float("nan")
    return out


def _step_is_finite(accelerator: Accelerator, grad_norm: torch.Tensor, losses: list[torch.Tensor]) -> bool:
    """Whether the step's gradient norm and every micro-batch loss on every process are finite.

    The loss is checked too: an infinite loss can come with a finite gradient (e.g. DPO with an
    infinite reference log-prob, where the log-sigmoid saturates), and all ranks must agree.
    """
    bad = (~torch.isfinite(torch.stack(losses))).any() | ~torch.isfinite(grad_norm.detach().float().reshape(()))
    return not bool(accelerator.reduce(bad.float().to(accelerator.device), "sum") > 0)


def _configure_deepspeed(accelerator: Accelerator, cfg: CommonConfig) -> None:
    """DeepSpeed takes the micro-batch size, accumulation and clipping from mmpo's config.

    No DataLoader goes through ``prepare()``, so DeepSpeed cannot infer the batch size, and its
    accumulation steps would otherwise override the engine's silently.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
    plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm


def _clip(accelerator: Accelerator, model, max_norm: float) -> torch.Tensor:
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    # DeepSpeed clips inside its own step and reports the norm as a float (None if it has none).
    return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)


def final_model_dir(output_dir: str | Path) -> Path | None:
    """Where the finished run's model is: the top of ``output_dir`` (as HF Trainer leaves it) once
    published, else the newest checkpoint's ``model/``."""
    if (Path(output_dir) / "config.json").is_file() or (Path(output_dir) / "adapter_config.json").is_file():
        return Path(output_dir)
    found = checkpoint.list_checkpoints(output_dir)
    return found[-1] / MODEL_DIR if found else None


def publish_final_model(cfg: CommonConfig, accelerator: Accelerator, result: RunResult, summary: dict) -> None:
    """The final model (or adapter), its model card and ``trainer_state.json`` at the top of ``output_dir``."""
    if not accelerator.is_main_process:
        return
    found = checkpoint.list_checkpoints(cfg.output_dir)
    if not found:
        return
    from mmpo.config import to_dict
    from mmpo.publish.export import copy_final_model
    from mmpo.publish.model_card import invocation, write_model_card
    from mmpo.publish.trainer_state import write_trainer_state

    run_dir = RunDir(cfg.output_dir)
    copy_final_model(found[-1] / MODEL_DIR, run_dir.path)
    write_trainer_state(run_dir.path / TRAINER_STATE_FILE, checkpoint.read_trainer_state(found[-1]))
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_model_card(run_dir.path, to_dict(cfg), metrics=metrics, command=invocation(), adapter=cfg.lora)
