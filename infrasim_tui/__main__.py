"""``python -m infrasim_tui`` is ``infrasim`` (the CLI starts daemons this way)."""

import sys

from .cli import main

sys.exit(main())
