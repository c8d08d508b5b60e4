# src/defectvad/engine/devices.py
import contextlib

import torch

from defectvad.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(accelerator):
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware=cuda but no CUDA device is available; use hardware=cpu or hardware=auto")
    if accelerator not in ("cpu", "cuda"):
        raise ConfigError(f"unknown accelerator '{accelerator}'; choose one of: cpu, cuda, auto")
    return torch.device(accelerator)


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    return precision


def autocast(device, precision):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads):
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
