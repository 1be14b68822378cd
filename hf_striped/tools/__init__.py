"""Helpers the scripts share: the pretrained SmolLM2 checkpoint, text data for the demo job,
model cards, and memory accounting for benchmarks and tests."""
