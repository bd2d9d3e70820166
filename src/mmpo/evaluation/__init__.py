"""Evaluation: generation, pairwise judges, (length-controlled) win-rate, lm-eval retention.

The pipeline of the paper's preference evaluation, one function per step::

    prompts = load_instructions("tatsu-lab/alpaca_eval")            # or a local .json/.jsonl
    model = generate_outputs("ckpt/", None, prompts, generator_name="mmpo")
    sft = generate_outputs("sft/", None, prompts, generator_name="sft")
    rows = AlpacaEvalAnnotator().annotate(model, sft, cache_path="ae.json", work_dir=".")  # the paper's judge
    rows = judge_pairs(AnthropicJudge("claude-haiku-4-5-20251001"), model, sft, cache_path="judge_cache.jsonl")
    summary = summarize_judgments(rows)          # win_rate, length_controlled_winrate, errors
    average_over_judges({"alpaca_eval": summary, "claude-haiku": other_summary})

and capability retention with ``run_harness("ckpt/", PAPER_TASKS)``.
"""

from mmpo.evaluation.alpaca_annotator import PAPER_ANNOTATOR, AlpacaEvalAnnotator
from mmpo.evaluation.annotations import write_annotations
from mmpo.evaluation.generate import (
    ALPACA_EVAL_HUB_ID,
    generate_outputs,
    load_generation_model,
    load_instructions,
    write_model_outputs,
)
from mmpo.evaluation.harness import PAPER_TASKS, run_harness, summarize_lm_eval_results, write_local_task_yamls
from mmpo.evaluation.judges import (
    AnthropicJudge,
    EndpointUnreachableError,
    FatalJudgeError,
    Judge,
    JudgeError,
    JudgeVerdict,
    MissingAPIKeyError,
    OpenAIJudge,
    ProgrammaticJudge,
    RateLimitError,
    TransientJudgeError,
)
from mmpo.evaluation.judging import JudgmentCache, judge_pairs
from mmpo.evaluation.winrate import (
    WinRateError,
    average_over_judges,
    length_controlled_win_rate,
    summarize_judgments,
    win_rate,
)

__all__ = [
    "ALPACA_EVAL_HUB_ID",
    "PAPER_ANNOTATOR",
    "AlpacaEvalAnnotator",
    "write_annotations",
    "load_instructions",
    "load_generation_model",
    "generate_outputs",
    "write_model_outputs",
    "Judge",
    "JudgeVerdict",
    "JudgeError",
    "TransientJudgeError",
    "RateLimitError",
    "FatalJudgeError",
    "MissingAPIKeyError",
    "EndpointUnreachableError",
    "OpenAIJudge",
    "AnthropicJudge",
    "ProgrammaticJudge",
    "JudgmentCache",
    "judge_pairs",
    "WinRateError",
    "win_rate",
    "length_controlled_win_rate",
    "summarize_judgments",
    "average_over_judges",
    "PAPER_TASKS",
    "run_harness",
    "summarize_lm_eval_results",
    "write_local_task_yamls",
]
