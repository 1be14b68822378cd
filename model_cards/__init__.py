"""Model card templates (installed as ``hf_striped.model_cards``); rendered by ``hf_striped.model_card``."""
