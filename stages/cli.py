"""How every stage ends: bad input is one line on stderr and exit 2, a failed job its report and exit 1."""

from __future__ import annotations

import sys
from typing import Callable

from slurm.submit import JobFailed
from stages.errors import EXIT_USER_ERROR, UserError


def run(main: Callable[[], None]) -> int:
    try:
        main()
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    except JobFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0
