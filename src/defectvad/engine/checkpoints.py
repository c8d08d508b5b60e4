# src/defectvad/engine/checkpoints.py
from pathlib import Path

from safetensors.torch import load_file, save

from defectvad.atomic_files import atomic_write
from defectvad.errors import DefectVADError


def save_weights(module, path):
    tensors = contiguous_unshared(module.state_dict())
    # serialised in memory and written by Python, so that a full or read-only disk raises an OSError
    with atomic_write(path) as tmp:
        tmp.write_bytes(save(tensors))
    return Path(path)


def contiguous_unshared(state):
    # safetensors refuses shared or strided storage: a tensor is copied only when it is strided or its
    # storage is already taken, so a large buffer (PaDiM's inverse covariances) is not held twice
    tensors, storages = {}, set()
    for name, value in state.items():
        value = value.detach().cpu().contiguous()
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[name] = value
    return tensors


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

