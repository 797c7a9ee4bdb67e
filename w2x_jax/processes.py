"""Whether a process still runs: the test for leftovers (shared-memory blocks of the patch workers,
the web page's temporary folders) of processes that were killed and could not remove them."""

import os


def pid_alive(pid):
  """True if process `pid` runs (this user's or another's); False if there is none."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return pid <= 2 ** 31 - 1  # someone else's process, or no process at all
  return True
