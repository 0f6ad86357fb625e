"""``python -m megatron_lite.search``: PAR's search over sublayer orders; the code is
:mod:`megatron_lite.experiments.search`."""

import sys

from megatron_lite.experiments.search import main

if __name__ == "__main__":
    sys.exit(main())
