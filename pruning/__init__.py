"""Structured pruning for BERT-family classifiers: gate states, gating hooks, surgery, export."""
