"""Keep Ctrl-C for the main thread.

A process-wide signal such as the SIGINT a terminal sends on Ctrl-C goes to any one thread
that does not block it. Python runs its handler in the main thread later, but a main thread
blocked in C (``input()`` under readline waits in ``select()`` and checks for signals only
when that call is interrupted) is not woken when another thread took the signal: Ctrl-C at
``assist chat``'s prompt then did nothing until the next Enter. Our worker threads (the
engine's loop, grammar compiles, ``to_thread`` pools) therefore block the signals a person
sends, and so do the threads they start (torch's OpenMP pool), which inherit the mask.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["quiet_thread", "start_quiet"]

# What a terminal or a supervisor sends to stop us; the main thread alone should take them.
_MASK = frozenset(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                  if hasattr(signal, s))


def quiet_thread() -> None:
    """Block those signals in the calling thread; a ``ThreadPoolExecutor`` initializer."""
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is not threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, _MASK)


def start_quiet(thread: threading.Thread) -> None:
    """``thread.start()`` with those signals blocked from its first instruction on.

    The mask is inherited at thread creation, so it is set around ``start()`` in the caller
    and restored there: no window in which the new thread could take a Ctrl-C.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no per-thread masks
        thread.start()
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _MASK)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
