"""``python -m megatron_lite.distill``: MiniLM / MiniLMv2 distillation; the code is
:mod:`megatron_lite.experiments.distill`."""

import sys

from megatron_lite.experiments.distill import main

if __name__ == "__main__":
    sys.exit(main())
