"""The embedded offline world: a tokenizer, a tiny model and checkable chat/preference data."""
