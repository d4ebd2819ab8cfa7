"""Fault handling: SIGTERM/SIGUSR1 and stop files (watchdog), non-finite step rollback (step guard)."""
