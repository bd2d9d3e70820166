"""Using mmpo's objectives inside other libraries' trainers (``mmpo.integrations.trl``: TRL's ``DPOTrainer``).

Each submodule imports its library itself, so ``import mmpo`` never needs them.
"""
