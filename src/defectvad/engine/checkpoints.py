# src/defectvad/engine/checkpoints.py
from pathlib import Path

import json
import struct

import torch
from safetensors.torch import load_file

from defectvad.atomic_files import atomic_write
from defectvad.errors import DefectVADError

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def save_weights(module, path):
    tensors = contiguous_unshared(module.state_dict())
    # the safetensors layout written by Python tensor by tensor: a full or read-only disk raises an OSError,
    # and the file is never assembled in memory beside the model
    with atomic_write(path) as tmp, open(tmp, "wb") as out:
        write_safetensors(out, tensors)
    return Path(path)


def write_safetensors(out, tensors):
    # 8-byte little-endian header length, a JSON header (dtype, shape, byte range of each tensor) padded with
    # spaces to a multiple of 8, then the tensors' bytes in header order
    header, offset = {}, 0
    for name, value in tensors.items():
        size = value.numel() * value.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out.write(struct.pack("<Q", len(text)))
    out.write(text)
    for value in tensors.values():
        if value.numel():
            out.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))


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

