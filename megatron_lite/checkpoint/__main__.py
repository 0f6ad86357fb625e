"""``python -m megatron_lite.checkpoint``: see :mod:`megatron_lite.checkpoint.commands`."""

import sys

from megatron_lite.checkpoint.commands import main

sys.exit(main())
