"""Interpretability: TransformerLens' hook points, the activation cache, plots."""
