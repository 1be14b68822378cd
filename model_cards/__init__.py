"""Model card templates (installed as ``hf_striped.model_cards``); rendered by ``hf_striped.tools.model_card``."""
