"""Research code built on the library, one way (torchtitan's ``experiments/`` rule): it
imports the core (models, training, parallel, data, checkpoint), the core never imports
it (``tests/test_imports.py`` checks).

- :mod:`.search`, :mod:`.supernet`: PAR's search over sublayer orders (Mandava et al.
  2020), ``python -m megatron_lite.search``;
- :mod:`.distill`, :mod:`.relations`: MiniLM / MiniLMv2 distillation (Wang et al. 2020,
  2021), ``python -m megatron_lite.distill``.
"""
