"""The ring core: token layouts, the ring schedule, block merging, message transport, the
bounded collectives every cross-rank check goes through, and ring attention as differentiable
functions. Nothing here imports Transformers."""
