"""Supervised fine-tuning on chat data, loss on assistant tokens: the recipe behind ``mmpo sft``."""

from __future__ import annotations

import torch
from accelerate.utils import set_seed

from mmpo.config import SFTConfig, apply_preset, resolve
from mmpo.data import load_sft_examples
from mmpo.forward import ForwardOptions, sft_loss
from mmpo.modeling import load_model, load_tokenizer
from mmpo.training.loop import (
    Recipe,
    RunResult,
    check_resume_data,
    final_model_dir,
    prepare_run_dir,
    publish_final_model,
    run,
)
from mmpo.training.preference import require_examples
from mmpo.training.setup import init_trackers, make_accelerator, settle_batch


def sft(cfg: SFTConfig, model: torch.nn.Module | None = None, tokenizer=None) -> RunResult:
    """Supervised fine-tuning as configured. The Python API behind ``mmpo sft``.

    ``model``/``tokenizer`` may be passed in (e.g. a freshly initialized model) instead of loading
    ``cfg.model``.
    """
    cfg = settle_batch(resolve(apply_preset(cfg)))
    options = ForwardOptions.from_config(cfg)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    run_dir = prepare_run_dir(cfg, accelerator)
    tokenizer = tokenizer or load_tokenizer(
        cfg.model, trust_remote_code=cfg.trust_remote_code, chat_template_path=cfg.chat_template_path
    )
    data_settings = dict(seed=cfg.seed, max_length=cfg.max_length, on_bad_rows=cfg.on_bad_rows)
    train_examples, report = load_sft_examples(cfg.dataset, tokenizer, **data_settings)
    require_examples("SFT", report)
    accelerator.print(f"SFT data: {report.summary()}")
    check_resume_data(cfg, accelerator, train_examples)  # before the model is loaded
    eval_examples, eval_report = [], None
    if cfg.eval_dataset:
        eval_examples, eval_report = load_sft_examples(cfg.eval_dataset, tokenizer, **data_settings)
        accelerator.print(f"SFT eval data: {eval_report.summary()}")
    if accelerator.is_main_process:
        reports = {"train": report.to_dict(), "eval": eval_report.to_dict() if eval_report else None}
        run_dir.write_json(run_dir.data_report, reports)
    model = model if model is not None else load_model(cfg, train_dropout=True)
    model.to(accelerator.device)
    pad = tokenizer.pad_token_id

    def micro_step(model, batch, _step_examples):
        loss, _, num_tokens = sft_loss(model, batch, pad_token_id=pad, options=options)
        return loss, {}, num_tokens

    def evaluate(model):
        model.eval()
        total, count = 0.0, 0
        size = cfg.per_device_batch_size
        with torch.no_grad():
            for start in range(accelerator.process_index * size, len(eval_examples), size * accelerator.num_processes):
                loss, n, _ = sft_loss(model, eval_examples[start : start + size], pad_token_id=pad, options=options)
                total, count = total + float(loss) * n, count + n
        sums = accelerator.reduce(torch.tensor([total, count], device=accelerator.device, dtype=torch.float64), "sum")
        return {"eval_loss": float(sums[0] / max(sums[1], 1))}

    init_trackers(accelerator, cfg, "mmpo-sft")
    recipe = Recipe("sft", train_examples, micro_step, evaluate if eval_examples else None, data_checked=True)
    result = run(cfg, accelerator, model, tokenizer, recipe)
    publish_final_model(cfg, accelerator, result, {"steps": result.global_step})
    result.summary = {
        "output_dir": str(cfg.output_dir),
        "steps": result.global_step,
        "final_checkpoint": str(final_model_dir(cfg.output_dir)),
    }
    if accelerator.is_main_process:
        run_dir.write_json(run_dir.summary, result.summary)
    return result
