# src/defectvad/models/efficient_ad/imagenette.py
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from defectvad.data.images import is_image_file
from defectvad.errors import DatasetError

IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz"


def find_penalty_images(folder):
    folder = Path(folder).expanduser()
    files = sorted(p for p in folder.rglob("*") if is_image_file(p)) if folder.is_dir() else []
    if not files:
        problem = "has no images" if folder.is_dir() else "does not exist"
        raise DatasetError(
            f"EfficientAD's ImageNet penalty images not found: {folder.resolve()} {problem}; on a machine that is "
            f"online fetch {IMAGENETTE_URL} and extract it so that this folder holds its train/ and val/ folders, "
            f"or set model.imagenet_dir=null to train without the penalty"
        )
    return files


class ImagenetteDataset(Dataset):
    def __init__(self, folder, image_size):
        self.files = find_penalty_images(folder)
        height, width = image_size
        # as anomalib: resize to twice the size, grey in 30% of the draws, keep the centre; no normalisation
        self.transform = transforms.Compose([
            transforms.Resize((2 * height, 2 * width)),
            transforms.RandomGrayscale(p=0.3),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
        ])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))
