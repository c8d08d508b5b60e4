# src/defectvad/models/winclip/trainer.py
import logging

from defectvad.backbones.tokenizer import BPE_VOCAB, ClipTokenizer, load_tokenizer
from defectvad.backbones.weights import backbone_folder
from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.errors import ConfigError
from defectvad.models.winclip.prompting import DEFAULT_OBJECT, object_word
from defectvad.models.winclip.torch_model import BACKBONE, WinClipModel

log = logging.getLogger(__name__)


def load_prompt_tokenizer(backbone_dir, pretrained):
    # CLIP's vocabulary from the backbone folder; random weights without that file tokenize bytes only
    if pretrained or (backbone_folder(backbone_dir) / BPE_VOCAB["file"]).is_file():
        return load_tokenizer(backbone_dir)
    log.info("random CLIP weights and no %s in %s: the prompts are tokenized byte by byte", BPE_VOCAB["file"],
             backbone_folder(backbone_dir))
    return ClipTokenizer(None)


class WinClipTrainer(OnePassTrainer):
    # anomalib's WinClip: nothing is trained; k_shot 0 or null is zero-shot, k_shot > 0 few-shot on that many
    # normal reference images (dataset.k_shot, picked by the seed)
    learning_type = "zero_shot"
    # away from the backbone's own input size CLIP resizes its position embeddings with an antialiased bicubic,
    # which ONNX lacks (at 240x240 the export is untested)
    exportable = False

    def __init__(self, backbone=BACKBONE, weights_path=None, k_shot=0, scales=(2, 3), class_name=None,
                 object_words=False, backbone_dir=None, clip_architecture=None):
        super().__init__()
        if k_shot is not None and (not isinstance(k_shot, int) or isinstance(k_shot, bool) or k_shot < 0):
            raise ConfigError(f"WinCLIP's k_shot (dataset.k_shot) must be an integer >= 0 or null, got {k_shot!r}")
        if not scales or not all(isinstance(scale, int) and scale >= 1 for scale in scales):
            raise ConfigError(f"model.scales must be window sizes in patches (integers >= 1), got {scales!r}")
        self.k_shot = k_shot or 0
        self.learning_type = "few_shot" if self.k_shot else "zero_shot"
        self.class_name = class_name
        self.object_words = object_words
        tokenizer = load_prompt_tokenizer(backbone_dir, weights_path is not None)
        self.model = WinClipModel(backbone=backbone, weights_path=weights_path, scales=scales, tokenizer=tokenizer,
                                  architecture=clip_architecture)
        # a model rebuilt from saved weights scores with the reference embeddings those hold
        self.model.k_shot = self.k_shot

    def resolve_class_name(self, dataset):
        # model.class_name, else a folder data set's dataset.object_name, else the category (as anomalib: its
        # folder name; object_words: its readable word), else anomalib's "object"
        if self.class_name:
            return str(self.class_name)
        if getattr(dataset, "NAME", None) == "folder":
            return getattr(dataset, "object_name", None) or DEFAULT_OBJECT
        return object_word(getattr(dataset, "category", None), self.object_words)

    def prepare(self, loader):
        # the prompts are encoded once per class name, not per image
        class_name = self.resolve_class_name(loader.dataset)
        if class_name == self.model.class_name and self.model._text_embeddings.numel():
            return
        log.info("WinCLIP prompts name the object '%s'", class_name)
        self.model.to(self.device).eval()
        self.model.setup(class_name)
        self.save_checkpoints()

    def summary(self):
        return {"learning_type": self.learning_type, "k_shot": self.k_shot, "backbone": self.model.backbone,
                "class_name": self.model.class_name, "scales": list(self.model.scales),
                "reference_images": int(self.model._patch_embeddings.shape[0]) if self.k_shot else 0}
