"""Per-architecture adaptations for LlamaForCausalLM-style families (one small module per family
that needs anything, plus a registry keyed by ``model_type``). Filled by the model-coverage work;
until then only Llama-style models are exercised by the test suite."""
