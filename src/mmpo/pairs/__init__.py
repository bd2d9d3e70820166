"""Preference pairs from a model's own samples, graded by programmatic verifiers (``mmpo pairs``)."""

from mmpo.pairs.build import PairsOptions, PairsResult, make_pairs, report_lines, select_pairs
from mmpo.pairs.sampling import SamplingSettings, sample_completions
from mmpo.pairs.verifiers import BUILTIN_VERIFIERS, resolve_verifier, verify_by_task

__all__ = [
    "BUILTIN_VERIFIERS",
    "PairsOptions",
    "PairsResult",
    "SamplingSettings",
    "make_pairs",
    "report_lines",
    "resolve_verifier",
    "sample_completions",
    "select_pairs",
    "verify_by_task",
]
