"""``python -m infrasim_tui.terraform`` is ``terraform-provider-infrasim``."""

import sys

from .server import main

sys.exit(main())
