"""Analyses of a loaded classifier: attention capture, head roles, relevance."""
