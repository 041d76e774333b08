"""``python -m looppool status|pause|resume|restart ADDRESS``: see :mod:`looppool.control`."""

import sys

from .control import main

sys.exit(main())
