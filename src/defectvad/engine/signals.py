# src/defectvad/engine/signals.py
import signal


class Terminated(SystemExit):
    # exits with 128 + the signal's number and without a traceback, wherever it lands
    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum).name

    def __str__(self):
        return f"stopped by {self.signal}"


def terminate(signum, frame):
    raise Terminated(signum)


def stop_on_sigterm():
    # SIGTERM ends a run like Ctrl-C, with finally blocks: it is recorded as interrupted; a launcher's own handler stays
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, terminate):
            signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        pass  # not the main thread
