# src/defectvad/models/efficient_ad/torch_model.py
import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_SIZES = ("small", "medium")
# torch.quantile refuses larger inputs
QUANTILE_MAX_ELEMENTS = 2**24


def imagenet_norm_batch(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def reduce_tensor_elems(tensor, m=QUANTILE_MAX_ELEMENTS):
    tensor = torch.flatten(tensor)
    if len(tensor) > m:
        tensor = tensor[torch.randperm(len(tensor), device=tensor.device)[:m]]
    return tensor


class SmallPatchDescriptionNetwork(nn.Module):
    def __init__(self, out_channels, padding=False):
        super().__init__()
        pad = 1 if padding else 0
        self.conv1 = nn.Conv2d(3, 128, kernel_size=4, stride=1, padding=3 * pad)
        self.conv2 = nn.Conv2d(128, 256, kernel_size=4, stride=1, padding=3 * pad)
        self.conv3 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=pad)
        self.conv4 = nn.Conv2d(256, out_channels, kernel_size=4, stride=1, padding=0)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=pad)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=pad)

    def forward(self, x):
        x = imagenet_norm_batch(x)
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.conv4(x)


class MediumPatchDescriptionNetwork(nn.Module):
    def __init__(self, out_channels, padding=False):
        super().__init__()
        pad = 1 if padding else 0
        self.conv1 = nn.Conv2d(3, 256, kernel_size=4, stride=1, padding=3 * pad)
        self.conv2 = nn.Conv2d(256, 512, kernel_size=4, stride=1, padding=3 * pad)
        self.conv3 = nn.Conv2d(512, 512, kernel_size=1, stride=1, padding=0)
        self.conv4 = nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=pad)
        self.conv5 = nn.Conv2d(512, out_channels, kernel_size=4, stride=1, padding=0)
        self.conv6 = nn.Conv2d(out_channels, out_channels, kernel_size=1, stride=1, padding=0)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=pad)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=pad)

    def forward(self, x):
        x = imagenet_norm_batch(x)
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.relu(self.conv5(x))
        return self.conv6(x)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enconv1 = nn.Conv2d(3, 32, kernel_size=4, stride=2, padding=1)
        self.enconv2 = nn.Conv2d(32, 32, kernel_size=4, stride=2, padding=1)
        self.enconv3 = nn.Conv2d(32, 64, kernel_size=4, stride=2, padding=1)
        self.enconv4 = nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1)
        self.enconv5 = nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1)
        self.enconv6 = nn.Conv2d(64, 64, kernel_size=8, stride=1, padding=0)

    def forward(self, x):
        for conv in (self.enconv1, self.enconv2, self.enconv3, self.enconv4, self.enconv5):
            x = F.relu(conv(x))
        return self.enconv6(x)


class Decoder(nn.Module):
    def __init__(self, out_channels, padding):
        super().__init__()
        self.padding = padding
        # padding 2 on the 4x4 kernels grows each map by one pixel, which the sizes below count on
        for i in range(1, 7):
            setattr(self, f"deconv{i}", nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2))
        self.deconv7 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.deconv8 = nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1)
        for i in range(1, 7):
            setattr(self, f"dropout{i}", nn.Dropout(p=0.2))

    def upsample_sizes(self, image_size):
        h, w = image_size
        # the last size meets the PDN output: a quarter of the input, less 8 pixels without padding
        crop = 0 if self.padding else 8
        return [
            (h // 64 - 1, w // 64 - 1), (h // 32, w // 32), (h // 16 - 1, w // 16 - 1), (h // 8, w // 8),
            (h // 4 - 1, w // 4 - 1), (h // 2 - 1, w // 2 - 1), (math.ceil(h / 4) - crop, math.ceil(w / 4) - crop),
        ]

    def forward(self, x, image_size):
        sizes = self.upsample_sizes(image_size)
        for i, size in enumerate(sizes[:6], start=1):
            x = F.interpolate(x, size=size, mode="bilinear")
            x = getattr(self, f"dropout{i}")(F.relu(getattr(self, f"deconv{i}")(x)))
        x = F.interpolate(x, size=sizes[6], mode="bilinear")
        x = F.relu(self.deconv7(x))
        return self.deconv8(x)


class AutoEncoder(nn.Module):
    def __init__(self, out_channels, padding):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(out_channels, padding)

    def forward(self, x, image_size):
        return self.decoder(self.encoder(imagenet_norm_batch(x)), image_size)


class BufferDict(nn.Module):
    # named statistics that travel with the weights (state-dict keys and order as anomalib's ParameterDict)
    def __init__(self, tensors):
        super().__init__()
        for name in sorted(tensors):
            self.register_buffer(name, tensors[name])

    def __getitem__(self, name):
        return getattr(self, name)

    def update(self, tensors):
        for name, value in tensors.items():
            self[name].copy_(value)

    def is_set(self):
        return any(bool(value.sum() != 0) for value in self.buffers())


class EfficientAdModel(nn.Module):
    def __init__(self, teacher_out_channels=384, model_size="small", padding=False, pad_maps=True):
        super().__init__()
        if model_size not in MODEL_SIZES:
            raise ConfigError(f"model.model_size must be one of {', '.join(MODEL_SIZES)}, got {model_size!r}")
        network = SmallPatchDescriptionNetwork if model_size == "small" else MediumPatchDescriptionNetwork
        self.model_size = model_size
        self.pad_maps = pad_maps
        self.teacher_out_channels = teacher_out_channels
        self.teacher = network(teacher_out_channels, padding).eval()
        self.teacher.requires_grad_(False)
        # the first half imitates the teacher, the second half the autoencoder
        self.student = network(2 * teacher_out_channels, padding)
        self.ae = AutoEncoder(teacher_out_channels, padding)
        channels = (1, teacher_out_channels, 1, 1)
        self.mean_std = BufferDict({"mean": torch.zeros(channels), "std": torch.zeros(channels)})
        self.quantiles = BufferDict({name: torch.tensor(0.0) for name in ("qa_st", "qb_st", "qa_ae", "qb_ae")})

    def forward(self, batch, batch_imagenet=None, normalize=True):
        student_output, distance_st = self.compute_student_teacher_distance(batch)
        if self.training:
            return self.compute_losses(batch, batch_imagenet, distance_st)
        map_st, map_stae = self.compute_maps(batch, student_output, distance_st, normalize)
        anomaly_map = 0.5 * map_st + 0.5 * map_stae
        return InferenceBatch(torch.amax(anomaly_map, dim=(-3, -2, -1)), anomaly_map)

    def normalize_teacher(self, teacher_output):
        if not self.mean_std.is_set():
            return teacher_output
        return (teacher_output - self.mean_std["mean"]) / self.mean_std["std"]

    def compute_student_teacher_distance(self, batch):
        with torch.no_grad():
            teacher_output = self.normalize_teacher(self.teacher(batch))
        student_output = self.student(batch)
        distance_st = (teacher_output - student_output[:, : self.teacher_out_channels]) ** 2
        return student_output, distance_st

    def compute_losses(self, batch, batch_imagenet, distance_st):
        # hard feature loss: only the distances above their 99.9% quantile count
        distance_st = reduce_tensor_elems(distance_st.float())
        d_hard = torch.quantile(distance_st, 0.999)
        loss_st = torch.mean(distance_st[distance_st >= d_hard])
        if batch_imagenet is not None:
            # keeps the student from imitating the teacher on images unlike the training set
            penalty_output = self.student(batch_imagenet)[:, : self.teacher_out_channels]
            loss_st = loss_st + torch.mean(penalty_output**2)

        aug_img = self.choose_random_aug_image(batch)
        ae_output_aug = self.ae(aug_img, batch.shape[-2:])
        with torch.no_grad():
            teacher_output_aug = self.normalize_teacher(self.teacher(aug_img))
        student_output_ae_aug = self.student(aug_img)[:, self.teacher_out_channels :]
        loss_ae = torch.mean((teacher_output_aug - ae_output_aug) ** 2)
        loss_stae = torch.mean((ae_output_aug - student_output_ae_aug) ** 2)
        return loss_st, loss_ae, loss_stae

    @staticmethod
    def choose_random_aug_image(image):
        # brightness, contrast or saturation, by a factor drawn from U(0.8, 1.2); draws in anomalib's order
        coefficient = torch.empty(1).uniform_(0.8, 1.2).item()
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[int(torch.randint(0, 3, (1,)).item())]
        return adjust(image, coefficient)

    def compute_maps(self, batch, student_output, distance_st, normalize=True):
        image_size = batch.shape[-2:]
        with torch.no_grad():
            ae_output = self.ae(batch, image_size)
            map_st = torch.mean(distance_st, dim=1, keepdim=True)
            map_stae = torch.mean((ae_output - student_output[:, self.teacher_out_channels :]) ** 2, dim=1, keepdim=True)
        if self.pad_maps:
            map_st = F.pad(map_st, (4, 4, 4, 4))
            map_stae = F.pad(map_stae, (4, 4, 4, 4))
        map_st = F.interpolate(map_st, size=image_size, mode="bilinear")
        map_stae = F.interpolate(map_stae, size=image_size, mode="bilinear")
        if normalize and self.quantiles.is_set():
            q = self.quantiles
            map_st = 0.1 * (map_st - q["qa_st"]) / (q["qb_st"] - q["qa_st"])
            map_stae = 0.1 * (map_stae - q["qa_ae"]) / (q["qb_ae"] - q["qa_ae"])
        return map_st, map_stae

    def get_maps(self, batch, normalize=False):
        student_output, distance_st = self.compute_student_teacher_distance(batch)
        return self.compute_maps(batch, student_output, distance_st, normalize)
