# src/defectvad/metrics/streamed_pixels.py
# the pixel metrics of a tiled or full-resolution run: each test image's map goes into pixel histograms (all the
# images, and each category of a run over several) as it is predicted, so memory does not grow with the images.
# At the model's resolution the batch's masks are used; at full resolution each map is resized bilinearly
# (align_corners=False, as the models bring their maps to the input size) to its image's own size and compared with
# its mask read again from the file
import torch
from torch.nn import functional as F

from defectvad.metrics.pixel_histogram import PixelHistogram


class StreamedPixels:
    def __init__(self, dataset, full_resolution):
        self.dataset = dataset
        self.full_resolution = full_resolution
        self.samples = {sample["image_path"]: sample for sample in dataset.samples}
        self.total = PixelHistogram()
        self.categories = {}

    def add(self, maps, batch):
        for index, path in enumerate(batch["image_path"]):
            sample = self.samples[path]
            anomaly_map = maps[index:index + 1].float()
            if self.full_resolution:
                mask = torch.from_numpy(self.dataset.load_full_resolution_mask(sample))
                if tuple(anomaly_map.shape[-2:]) != tuple(mask.shape):
                    anomaly_map = F.interpolate(anomaly_map, size=tuple(mask.shape), mode="bilinear",
                                                align_corners=False)
            else:
                mask = batch["mask"][index, 0] > 0.5
            anomaly_map = anomaly_map[0, 0].cpu()
            self.total.add(anomaly_map, mask.cpu())
            if "category" in sample:
                self.categories.setdefault(sample["category"], PixelHistogram()).add(anomaly_map, mask.cpu())
