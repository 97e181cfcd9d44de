"""Lowering to hardware targets (installed as ``graphopt.targets``)."""
