# src/defectvad/backbones/clip_loading.py
from defectvad.backbones.clip import CLIP, CLIP_ARCHITECTURES
from defectvad.backbones.registry import BACKBONES, find_entry, get_backbone
from defectvad.backbones.weights import load_state_dict
from defectvad.errors import BackboneError, ConfigError


def clip_backbones():
    return [name for name, spec in BACKBONES.items() if spec.family == "clip"]


def load_clip(backbone, weights_path, architecture, model_name, default_note):
    # the whole CLIP of a model that runs on CLIP alone; architecture: sizes that replace the backbone's where not
    # None (random weights only: small CLIPs for tests); default_note names the model's usual backbone
    architecture = {key: value for key, value in (architecture or {}).items() if value is not None}
    if get_backbone(backbone).family != "clip":
        raise ConfigError(f"{model_name} runs on a CLIP backbone, not {backbone}: choose one of "
                          f"{', '.join(clip_backbones())} ({default_note})")
    if architecture and weights_path is not None:
        raise ConfigError("model.clip_architecture replaces the CLIP's sizes, so no weights file fits it: "
                          "set backbone.pretrained=false")
    clip = CLIP(**{**CLIP_ARCHITECTURES[backbone], **architecture})
    if weights_path is not None:
        state = load_state_dict(weights_path)
        _, entry = find_entry(weights_path)
        if entry is not None and entry["convert"] is not None:
            state = entry["convert"](state)
        missing, unexpected = clip.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(f"{weights_path} does not fit CLIP {backbone} ({len(missing)} tensors missing, "
                                f"{len(unexpected)} unexpected, first: {(missing or unexpected)[0]})")
    return clip.eval()
