"""A world for a real small chat model (SmolLM2-135M-Instruct): task families chosen by measuring it,
held-out prompts, and multiple-choice retention tasks of what it already does well."""
