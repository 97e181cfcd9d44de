"""Operator fusions for runtimes (level "fuse"): rewrite rules that introduce fused ops."""
