"""The forward pass: completion log-probs of tokenized examples.

The data loader hands over lists of tokenized examples (see docs/architecture.md) and this module
builds the tensors, so the layout (padding, shared prompt, packing) is decided here and nowhere
else. ``preference_logps`` and ``sft_loss`` without ``options`` run the plain padded path: the
reference every faster path must match (tests/forward/ checks log-probs and gradients).

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

How attention keeps sequences apart in those layouts (the first that the model allows and a
one-time probe on it shows equal to the padded path; otherwise the padded path, with a warning):

* **flex** (CUDA; models set to sdpa or flex_attention) - FlexAttention with a block-sparse mask
  built once per micro-batch from the layout (``flex.py``): one fused kernel per layer that skips
  the masked blocks.
* **segmented** (the same models; the CPU path) - one sdpa call per sequence part (``attention.py``).
* **mask** (sdpa or eager) - one dense call with a ``[rows, 1, width, width]`` mask.

The first two are our attention functions, registered with transformers under their own names
(``mmpo_flex``, ``mmpo_segmented``) and selected on the model's config only while our forward
pass runs (and when checkpointed layers replay it): transformers' ``sdpa`` itself is never
replaced. Optionally (``liger_head``), Liger-Kernel's fused linear cross-entropy scores the
completion tokens on CUDA where it is installed (``liger.py``).
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
