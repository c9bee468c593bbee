"""Ctrl-C and SIGTERM without losing work: finish the step, save, say how to resume."""
import signal
import sys


class GracefulStop:
    """While active, SIGINT/SIGTERM only set a flag that the train loop checks after
    each step. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            # The same signal usually reaches the DataLoader workers too (Ctrl-C, or the
            # SIGTERM of systemd, Slurm or `docker stop` to the process group). PyTorch's
            # SIGCHLD handler would then raise "worker killed" anywhere, even while the
            # checkpoint is being written; the loop handles dead workers itself from now on.
            self.previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        self.signum = signum
        print(f'\n{signal.Signals(signum).name} received: finishing this step, then saving a '
              f'checkpoint (Ctrl-C again to abort at once)', file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    def workers_lost(self, exc):
        """True for the error a DataLoader raises when its workers died after a stop
        was requested: the run then saves and exits as for any stop."""
        return self.requested and isinstance(exc, RuntimeError) and 'DataLoader worker' in str(exc)

    @property
    def exit_code(self):
        """130 for Ctrl-C, as shells report it; 0 for a polite SIGTERM."""
        return 130 if self.signum == signal.SIGINT else 0
