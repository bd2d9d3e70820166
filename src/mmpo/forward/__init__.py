"""The forward pass: completion log-probs of tokenized examples.

The data loader hands over lists of tokenized examples (see docs/architecture.md) and this module
builds the tensors, so the layout (padding, shared prompt, packing) is decided here and nowhere
else. ``preference_logps`` and ``sft_loss`` without ``options`` run the plain padded path: the
reference every faster path must match (tests/test_forward.py checks log-probs and gradients).

The fast paths (``ForwardOptions``; all exact, all on by default; see docs/performance.md):

* **shared prompt** - a pair is one sequence ``prompt + chosen + rejected``; a 4D attention mask
  hides the chosen tokens from the rejected ones and position ids restart after the prompt, so
  the prompt is computed once and the rejected tokens see exactly what they would see alone.
* **packing** - several sequences (or pairs) share a row, with a block-diagonal mask and
  per-sequence positions. Rows are filled first-fit decreasing at the width that minimizes an
  estimate of padding plus (quadratic, dense-masked) attention cost.
* **chunked log-probs** - only the positions that predict a completion token go through the LM
  head, a chunk at a time under activation checkpointing, so ``[tokens, vocab]`` float32 logits
  exist for one chunk only, in the forward and in the backward pass.
* **selective recompute** - each decoder layer keeps only its matmul and attention outputs for
  the backward pass; norms, RoPE and activations are replayed from them (torch's selective
  activation checkpointing).

A layout that needs a 4D mask is used only with attention kernels that honour one (``sdpa``,
``eager``) and after a one-time probe on the model shows it matches the padded path; otherwise
the padded path runs, with a warning once.
"""

from mmpo.forward.logps import preference_logps, sft_loss
from mmpo.forward.options import ForwardOptions, PreferenceLogps
from mmpo.forward.padded import pad_sequences, token_logps_and_entropy
from mmpo.forward.scoring import score_hidden

__all__ = [
    "ForwardOptions",
    "PreferenceLogps",
    "pad_sequences",
    "preference_logps",
    "score_hidden",
    "sft_loss",
    "token_logps_and_entropy",
]
