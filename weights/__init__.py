"""Bundled model bundles (card.json + model.safetensors), one folder each."""
