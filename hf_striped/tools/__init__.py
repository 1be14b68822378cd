"""Helpers the scripts share: the pretrained SmolLM2 checkpoint, text data for the demo job,
model cards, memory accounting for benchmarks and tests, and matplotlib for plots."""
