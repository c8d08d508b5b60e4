# src/defectvad/engine/checkpoints.py
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from defectvad.errors import DefectVADError


def save_weights(module, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def load_weights(module, path):
    path = Path(path)
    if not path.is_file():
        raise DefectVADError(f"weights file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise DefectVADError(f"cannot read weights file {path}: {error}") from error
    module.load_state_dict(tensors)
    return module

