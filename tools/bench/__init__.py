"""Shared helpers for graphopt's side-by-side benchmarks (``tools/bench_*.py``).

- :mod:`.child`: run one step in a fresh process with a timeout, and get back its result, wall time and
  peak RSS; a tool that crashes or hangs costs one row, not the whole benchmark.
- :mod:`.sessions`: onnxruntime CPU sessions made the same way everywhere (2 intra-op threads that do not
  spin, a named optimization level, offline saving of onnxruntime's own rewrite).
- :mod:`.latency`: interleaved latency measurement (A B C, B C A, ..., each model warm in its round) with medians.
- :mod:`.pairing`: the paired ratio of interleaved timings (standard library only, for the GPU side).
- :mod:`.numerics`: reference outputs of the original and the comparison of a candidate with them.
- :mod:`.stats`: node counts (top level and in subgraphs), file size including external data.
- :mod:`.markdown`: small table rendering.

Facts these follow (``shared/DESIGN.md``): speed on the benchmark machine drifts by up to 2.5x within a
session, so variants are interleaved, medians are reported, and ratios come from the same run; idle
spinning onnxruntime threads of one session slow another down, so every session disables spinning.
"""
