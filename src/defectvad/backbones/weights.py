# src/defectvad/backbones/weights.py
import hashlib
import importlib.util
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from defectvad.backbones.registry import files_for, find_entry
from defectvad.errors import BackboneError

DOWNLOAD_TOOL = "python tools/backbones.py --download"
_verified = {}


def backbone_folder(backbone_dir=None):
    if backbone_dir is None:
        backbone_dir = os.environ.get("BACKBONE_DIR", "backbones")
    return Path(backbone_dir).expanduser().resolve()


def packaged_file(entry, file):
    # a weight file that ships inside an installed pip package
    spec = importlib.util.find_spec(entry["package"]) if entry.get("package") else None
    if spec is None or spec.origin is None:
        return None
    return next(Path(spec.origin).parent.rglob(Path(file).name), None)


def resolve_weights(name, backbone_dir=None, file=None):
    supported = files_for(name)
    folder = backbone_folder(backbone_dir)
    if file is not None:
        owner, entry = find_entry(file)
        if entry is not None and owner != name:
            raise BackboneError(f"{file} holds {owner} weights, not {name}; use one of: {', '.join(supported)}")
        if Path(file).expanduser().is_absolute():
            folder = Path(file).expanduser().parent
        candidates = [folder / Path(file).expanduser()]
        wanted = [entry["file"] if entry else str(file)]
    else:
        candidates = [folder / f for f in supported]
        wanted = supported
    for path in candidates:
        if path.is_dir():
            # a hub folder: the first of the backbone's files that lives in a folder of this name
            inside = [Path(f).name for f in supported if Path(f).parent.name == path.name] or ["model.safetensors"]
            path = next((path / name for name in inside if (path / name).is_file()), path / inside[0])
        if path.is_file():
            return path
    for f in wanted:
        _, entry = find_entry(f)
        path = packaged_file(entry, f) if entry else None
        if path is not None:
            return path
    raise BackboneError(missing_message(name, folder, wanted))


def missing_message(name, folder, wanted):
    _, first = find_entry(wanted[0])
    others = f" (or {', '.join(wanted[1:])})" if len(wanted) > 1 else ""
    text = f"weights for backbone {name} not found: expected {wanted[0]}{others} in {folder}"
    if first is None:
        return text + "; check the file name and paths.backbone_dir"
    if first["package"]:
        return (
            f"{text}; install the pip package that ships it ({first['url']}) "
            f"or copy the file into that folder"
        )
    return (
        f"{text}; on a machine that is online run: {DOWNLOAD_TOOL} {name} "
        f"(or fetch {first['url']}), then copy it into that folder"
    )


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(path, file=None):
    # file: the manifest name to check against, when the path does not carry it (a download in progress)
    path = Path(path).resolve()
    if not path.is_file():
        raise BackboneError(f"weight file {path} does not exist")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return path
    owner, entry = find_entry(file or path)
    if entry is not None:
        if entry["sha256"] or entry["sha256_prefix"]:
            check_hash(path, entry)
        if path.suffix == ".safetensors":
            check_safetensors(path, owner, entry)
    _verified[key] = True
    return path


def check_hash(path, entry):
    actual = file_sha256(path)
    expected = entry["sha256"] or entry["sha256_prefix"]
    if actual.startswith(expected):
        return
    raise BackboneError(
        f"{path} hash does not match its name: sha256 starts with {actual[:8]}, expected {expected[:8]}; "
        f"the file is damaged or not the original, fetch it again from {entry['url']}"
    )


def check_safetensors(path, owner, entry):
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in entry["check"] if k in f.keys()}
    except Exception:
        raise BackboneError(f"{path} is not a readable safetensors file; fetch it again from {entry['url']}") from None
    for key, shape in entry["check"].items():
        if shapes.get(key) != tuple(shape):
            raise BackboneError(
                f"{path} does not hold {owner} weights (tensor {key} missing or of another shape); "
                f"fetch it again from {entry['url']}"
            )


def load_state_dict(path, verify=True):
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weight file {path.resolve()} does not exist")
    if verify:
        verify_weights(path)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = load_pickled(path)
    else:
        raise BackboneError(f"{path} has an unsupported file type; use a .pth or .safetensors file")
    return plain_state_dict(state, path)


def load_safetensors(path):
    try:
        return load_file(str(path), device="cpu")
    except Exception:
        raise BackboneError(f"{path} is not a readable safetensors file; copy it again") from None


def load_pickled(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        refused = True
    except RuntimeError as error:
        refused = "weights_only" in str(error) or "Weights only" in str(error)
    except Exception:
        refused = False
    if refused:
        raise BackboneError(
            f"{path} is not a plain weights file and was refused (it holds code or objects other than tensors, "
            f"or is damaged); use the original file listed in backbones/README.md"
        )
    raise BackboneError(f"{path} could not be read (damaged or incomplete?); copy it again")


def plain_state_dict(state, path):
    # training checkpoints often wrap the weights
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors; use a plain weights file")
    return dict(state)
