"""``python -m sida_moe ...`` is the ``sida-moe`` command."""

import sys

from sida_moe.cli import main

sys.exit(main())
