# src/defectvad/engine/checkpoints.py
from pathlib import Path

from safetensors.torch import load_file, save_file

from defectvad.atomic_files import atomic_write
from defectvad.errors import DefectVADError


def save_weights(module, path):
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in module.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp))
    return Path(path)


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

