"""Measurement and report tooling for ``scripts/`` (it lives in the checkout and is not
installed with ``flash_attn``).

- :mod:`.common`: wall time, peak memory, attention FLOPs, the machine's name.
- :mod:`.attention`: the attention benchmark behind ``scripts/bench_attention.py``.
- :mod:`.kernel_report`: what the compiler emits for a Triton kernel launch, for
  ``scripts/kernel_report.py``.
- :mod:`.triton_compile`: compile a kernel for a GPU that is not here.

A script run as ``python scripts/<name>.py`` imports ``checkout_path`` first, which puts the
checkout on ``sys.path`` so that ``benchmarks`` imports.
"""
