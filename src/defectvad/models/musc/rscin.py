# src/defectvad/models/musc/rscin.py
# MuSc's RsCIN (re-scoring with constrained image-level neighbourhoods): the image scores, min-max scaled over
# the set, are averaged over each image's k most similar images (class-token dot products as weights, the
# image itself included when it is among them), and the averages for the k in k_list are averaged
import torch


def rescore_images(scores, class_tokens, k_list=(1, 2, 3)):
    # scores (N,), class_tokens (N, D) -> (N,); k_list null, empty or holding 0 keeps the scores as they are
    if not k_list or 0 in k_list:
        return scores
    scores = scores.double()
    spread = scores.max() - scores.min()
    scaled = (scores - scores.min()) / spread if spread > 0 else torch.zeros_like(scores)
    scaled = scaled.float()
    tokens = class_tokens.float()
    similarity = tokens @ tokens.T
    rescored = []
    for k in k_list:
        values, index = similarity.topk(min(int(k), len(scores)), dim=1)
        weights = torch.zeros_like(similarity).scatter_(1, index, values)
        rescored.append(weights @ scaled / weights.sum(1))
    return torch.stack(rescored, -1).mean(-1)
