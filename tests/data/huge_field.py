"""Tokenize one preference row whose prompt and chosen fields are SIZE characters; print the time and
the peak memory it took. ``python tests/data/huge_field.py SIZE [uncapped]`` (``uncapped``: without
the character cap, as before it existed). Used by ``test_bad_lines_and_huge_fields.py``."""

import json
import resource
import sys
import time

import mmpo.data.cap
from mmpo.config import bundled_path
from mmpo.data import prepare_preference_examples
from mmpo.modeling import load_tokenizer

if sys.argv[2:] == ["uncapped"]:
    mmpo.data.cap.char_limit = lambda longest, limit: 1 << 62
tokenizer = load_tokenizer(str(bundled_path("sft_model")))
size = int(sys.argv[1])
text = ("banop zorbat mipo " * (size // 18 + 1))[:size]
row = {"id": "r", "prompt": text, "chosen": text + " yes", "rejected": "no"}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
examples, report = prepare_preference_examples([row], tokenizer, max_prompt_length=64, max_completion_length=32)
print(
    json.dumps(
        {
            "seconds": time.perf_counter() - started,
            "truncated": report.truncated,
            "prompt": len(examples[0]["prompt_ids"]),
            "chosen": len(examples[0]["chosen_ids"]),
            "extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
        }
    )
)
