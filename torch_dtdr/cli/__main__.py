"""``python -m torch_dtdr.cli``: the ``dtdr`` command."""

import sys

from . import main

sys.exit(main())
