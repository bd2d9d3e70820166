"""What a finished run publishes: the final model at the top of ``output_dir`` (``export``), LoRA
merging and the Hub push (``export``), the model card (``model_card``) and ``trainer_state.json`` in
HF Trainer's layout (``trainer_state``)."""
