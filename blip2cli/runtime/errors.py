"""The exceptions users see and the exit codes every command uses.

Exit codes (documented in the README):

- 0 ``EXIT_OK``: done.
- 1 ``EXIT_INTERNAL``: a bug in blip2 (one line; ``BLIP2_DEBUG=1`` shows the traceback).
- 2 ``EXIT_BAD_INPUT``: bad input or an unavailable resource, nothing or nothing more was done.
- 3 ``EXIT_PARTIAL``: finished, but some inputs were skipped (each was named on stderr).
- 75 ``EXIT_INTERRUPTED``: stopped by a signal after saving its state; rerun the same command to continue
  (75 is ``EX_TEMPFAIL`` of sysexits.h: schedulers read it as "retry").
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 75


class Blip2Error(Exception):
    """Bad input or an unavailable resource, explained in one line."""

    exit_code = EXIT_BAD_INPUT


class PartialFailure(Blip2Error):
    """The work finished, but some inputs were skipped; each was already reported on stderr."""

    exit_code = EXIT_PARTIAL


class Interrupted(Blip2Error):
    """A signal stopped the run after its state was saved; the same command continues it."""

    exit_code = EXIT_INTERRUPTED
