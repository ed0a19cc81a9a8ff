"""The one exception type stages turn into a clear message instead of a traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from mdser.console import quiet_native_logs


class UserError(Exception):
    """Bad input from the user: names the file or parameter and what is wrong."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit status 2.

    Outside a test process, TensorFlow's start-up noise is filtered from stderr first
    (`mdser.console`)."""
    if "pytest" not in sys.modules:
        quiet_native_logs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # let partial outputs be cleaned up
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
