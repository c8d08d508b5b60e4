# src/defectvad/sweeps/processes.py
import gc
import re
import signal
from pathlib import Path


def release_resources():
    # between runs of one process (a serial sweep, a joblib worker), so each run starts clean and measures its own peak
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        # Linux: 5 resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def read_peak_memory(device):
    try:
        status = Path("/proc/self/status").read_text()
        peak_rss_mb = round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024, 1)
    except (OSError, AttributeError):
        from defectvad.metrics.efficiency import measure_peak_rss_mb

        peak_rss_mb = measure_peak_rss_mb()
    resources = {"peak_rss_mb": peak_rss_mb}
    if device.type == "cuda":
        import torch

        resources["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return resources


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
