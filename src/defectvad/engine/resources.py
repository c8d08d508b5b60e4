# src/defectvad/engine/resources.py
import ctypes
import gc
import re
from pathlib import Path

# glibc's mallopt parameter and the threshold it starts with
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold():
    # glibc raises its mmap threshold each time a large block is freed, so later large tensors (an image's tiles, its
    # full-size map) come from the heap, which fragments and grows image after image (seen: +10 MB per 1024-pixel
    # tiled test image). A fixed threshold keeps them in their own mappings, given back when freed. Not glibc: no-op
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


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
