# src/defectvad/models/winclip/torch_model.py
# WinCLIP (Jeong et al., CVPR 2023) as anomalib 2.7's WinClipModel: the image, each sliding window of patches
# (the class token followed by the window's tokens, through the whole image tower) and the prompt ensemble
# are compared in CLIP's space; few-shot adds the distance to the reference images' windows and patches
import torch
from torch.nn import functional as F

from defectvad.backbones.clip_loading import load_clip
from defectvad.components.dynamic_buffers import DynamicBufferMixin
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import TrainingError
from defectvad.models.winclip.prompting import create_prompt_ensemble
from defectvad.models.winclip.scoring import class_scores, harmonic_aggregation, make_masks, visual_association_score

BACKBONE = "clip_vit_b16_plus_240"
# the temperature of the CLIP paper
TEMPERATURE = 0.07


class WinClipModel(DynamicBufferMixin):
    def __init__(self, backbone=BACKBONE, weights_path=None, scales=(2, 3), tokenizer=None, architecture=None):
        super().__init__()
        self.backbone = backbone
        self.temperature = TEMPERATURE
        self.scales = tuple(scales)
        self.tokenizer = tokenizer
        self.class_name = None
        self.k_shot = 0
        self.clip = load_clip(backbone, weights_path, architecture, "WinCLIP", f"anomalib's is {BACKBONE}")
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        self.grid_size = self.clip.visual.grid_size
        # anomalib's names: masks of the native grid (not saved), the averaged prompt embeddings (normal,
        # anomalous) and the reference images' window and patch embeddings
        for index, masks in enumerate(self.generate_masks(self.grid_size)):
            self.register_buffer(f"_masks_{index}", masks, persistent=False)
        self.register_buffer("_text_embeddings", torch.empty(0))
        for index in range(len(self.scales)):
            self.register_buffer(f"__visual_embeddings_{index}", torch.empty(0))
        self.register_buffer("_patch_embeddings", torch.empty(0))
        self.reference_store = []

    def generate_masks(self, grid_size):
        return [make_masks(grid_size, scale, 1) for scale in self.scales]

    def masks_for(self, grid_size):
        # the stored masks at the backbone's own size, others made for the input's patch grid
        if tuple(grid_size) == tuple(self.grid_size):
            return [getattr(self, f"_masks_{index}") for index in range(len(self.scales))]
        return [masks.to(self.clip.visual.proj.device) for masks in self.generate_masks(grid_size)]

    @property
    def text_embeddings(self):
        if self._text_embeddings.numel() == 0:
            raise TrainingError("WinCLIP has no text embeddings: prepare it with a class name, or load its weights")
        return self._text_embeddings

    @property
    def visual_embeddings(self):
        embeddings = [getattr(self, f"__visual_embeddings_{index}") for index in range(len(self.scales))]
        if embeddings[0].numel() == 0:
            raise TrainingError("WinCLIP is few-shot but holds no reference embeddings: fit it on the k reference "
                                "images, or load its weights")
        return embeddings

    @property
    def patch_embeddings(self):
        if self._patch_embeddings.numel() == 0:
            raise TrainingError("WinCLIP is few-shot but holds no reference patch embeddings: fit it on the k "
                                "reference images, or load its weights")
        return self._patch_embeddings

    def setup(self, class_name=None, reference_images=None):
        # anomalib's setup: the prompts' embeddings for the class, the reference images' embeddings
        self.class_name = class_name or self.class_name
        if self.class_name is not None:
            self.collect_text_embeddings(self.class_name)
        if reference_images is not None:
            self.collect(reference_images)
            self.fit()

    @torch.no_grad()
    def collect_text_embeddings(self, class_name):
        if self.tokenizer is None:
            raise TrainingError("WinCLIP has no tokenizer to encode its prompts")
        device = self._text_embeddings.device
        embeddings = []
        for prompts in create_prompt_ensemble(class_name):
            tokens = self.tokenizer(prompts)
            # nothing after the end token reaches it (causal mask): the context is cut behind the longest prompt
            tokens = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1].to(device)
            embeddings.append(self.clip.encode_text(tokens).float().mean(dim=0, keepdim=True))
        self._text_embeddings = torch.cat(embeddings)

    def encode_image(self, images):
        # image embeddings (B, E), window embeddings per scale (B, windows, E), patch tokens (B, patches, width)
        visual = self.clip.visual
        tokens = visual.embed_tokens(images)
        encoded = visual.encode_tokens(tokens)
        grid = (images.shape[-2] // visual.patch_size, images.shape[-1] // visual.patch_size)
        windows = [self.window_embeddings(tokens, masks) for masks in self.masks_for(grid)]
        return encoded[:, 0] @ visual.proj, windows, encoded[:, 1:]

    def window_embeddings(self, tokens, masks):
        # each window: the class token, then the window's patch tokens (after position embedding), through the tower
        batch, width = tokens.shape[0], tokens.shape[-1]
        windows = masks.shape[1]
        index = torch.cat([torch.zeros(1, windows, dtype=torch.long, device=masks.device), masks.long() + 1]).T
        selected = tokens[:, index.reshape(-1)].reshape(batch * windows, index.shape[1], width)
        pooled = self.clip.visual.encode_tokens(selected)[:, 0] @ self.clip.visual.proj
        return pooled.reshape(batch, windows, -1)

    @torch.no_grad()
    def collect(self, images):
        _, windows, patches = self.encode_image(images)
        self.reference_store.append((windows, patches))

    def fit(self):
        if not self.reference_store:
            raise TrainingError("WinCLIP saw no reference images; check the k_shot training images")
        for index in range(len(self.scales)):
            setattr(self, f"__visual_embeddings_{index}", torch.cat([windows[index] for windows, _ in self.reference_store]))
        self._patch_embeddings = torch.cat([patches for _, patches in self.reference_store])
        self.k_shot = self._patch_embeddings.shape[0]
        self.reference_store.clear()

    @torch.no_grad()
    def forward(self, images):
        if self.training:
            self.collect(images)
            return None
        grid = (images.shape[-2] // self.clip.visual.patch_size, images.shape[-1] // self.clip.visual.patch_size)
        image_embeddings, window_embeddings, patch_embeddings = self.encode_image(images)
        image_scores = class_scores(image_embeddings, self.text_embeddings, self.temperature, target_class=1)
        scores = self.compute_zero_shot_scores(image_scores, window_embeddings, grid)
        if self.k_shot:
            few_shot_scores = self.compute_few_shot_scores(patch_embeddings, window_embeddings, grid)
            scores = (scores + few_shot_scores) / 2
            image_scores = (image_scores + few_shot_scores.amax(dim=(-2, -1))) / 2
        anomaly_map = F.interpolate(scores.unsqueeze(1), size=images.shape[-2:], mode="bilinear")
        return InferenceBatch(pred_score=image_scores, anomaly_map=anomaly_map)

    def compute_zero_shot_scores(self, image_scores, window_embeddings, grid):
        # the whole image as one more scale, then the harmonic mean over the scales
        scores = [image_scores.view(-1, 1, 1).expand(-1, *grid)]
        for embeddings, masks in zip(window_embeddings, self.masks_for(grid)):
            window_scores = class_scores(embeddings, self.text_embeddings, self.temperature, target_class=1)
            scores.append(harmonic_aggregation(window_scores, grid, masks))
        return (len(self.scales) + 1) / (1 / torch.stack(scores)).sum(dim=0)

    def compute_few_shot_scores(self, patch_embeddings, window_embeddings, grid):
        # the patches and each scale's windows against the reference images', averaged over the scales
        if self.patch_embeddings.shape[1] != patch_embeddings.shape[1]:
            raise TrainingError(f"WinCLIP's reference images have {self.patch_embeddings.shape[1]} patches, these "
                                f"images {patch_embeddings.shape[1]}: use the same input size for both")
        scores = [visual_association_score(patch_embeddings, self.patch_embeddings).reshape(-1, *grid)]
        for embeddings, references, masks in zip(window_embeddings, self.visual_embeddings, self.masks_for(grid)):
            scores.append(harmonic_aggregation(visual_association_score(embeddings, references), grid, masks))
        return torch.stack(scores).mean(dim=0)
