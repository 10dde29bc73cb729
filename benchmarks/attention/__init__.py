"""The attention benchmark behind ``scripts/bench_attention.py``, one concern a module.

- :mod:`.case`: a configuration (:class:`Case`), what it measured (:class:`Result`), its memory
  estimate and the refusal of what would not fit.
- :mod:`.measure`: the methods compared, and the timing, memory and profile of one case.
- :mod:`.sweep`: the grids, running one, and its raw results as JSON.
- :mod:`.report`: a sweep's Markdown tables; :mod:`.plots`: its PNG figures.
"""
