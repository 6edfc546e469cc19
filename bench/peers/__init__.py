"""The peers of `bench.peers_bench` (Torch-Pruning, TextPruner, LXT, Captum), one module each, and the table."""
