"""Training on top of the integration: the striping collator, data-parallel x context-parallel
process groups with the exact loss, the Hugging Face Trainer subclass, and crash-safe checkpoints."""
