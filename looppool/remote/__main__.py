"""``python -m looppool.remote``: the launcher of a detached pool host (see :func:`shared`)."""

from .shared import _detached_main

_detached_main()
