# src/defectvad/models/ensemble/torch_model.py
import torch
from torch import nn

from defectvad.engine.inference_batch import InferenceBatch
from defectvad.models.ensemble.calibration import MemberCalibration
from defectvad.models.ensemble.fusion import MemberFusion
from defectvad.models.ensemble.members import resample_map

MEMBERS = "members."


class EnsembleModel(nn.Module):
    # runs each member on its own view of the input, resamples its map to map_size, calibrates scores and maps
    # per member and fuses them. Its state is the calibration and fusion buffers alone: the members' weights
    # stay in their own run folders
    def __init__(self, members, inputs, map_size, calibration="zscore", quantile=0.99, fusion="mean",
                 map_fusion="mean"):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.inputs = list(inputs)
        self.map_size = tuple(map_size)
        count = len(self.members)
        self.score_calibration = MemberCalibration(count, calibration, quantile)
        self.map_calibration = MemberCalibration(count, calibration, quantile)
        self.score_fusion = MemberFusion(count, fusion)
        self.map_fusion = MemberFusion(count, map_fusion)

    def run_members(self, images):
        # raw member outputs: scores (B, M), maps (B, M, H, W) at map_size
        scores, maps = [], []
        for member, view in zip(self.members, self.inputs):
            outputs = member(view(images))
            scores.append(outputs["pred_score"].float().reshape(-1))
            maps.append(resample_map(outputs["anomaly_map"].float(), self.map_size)[:, 0])
        return torch.stack(scores, dim=1), torch.stack(maps, dim=1)

    def fuse(self, scores, maps):
        score = self.score_fusion(self.score_calibration(scores), self.ranks(self.score_fusion, self.score_calibration,
                                                                             scores))
        anomaly_map = self.map_fusion(self.map_calibration(maps), self.ranks(self.map_fusion, self.map_calibration,
                                                                           maps))
        return score, anomaly_map.unsqueeze(1)

    @staticmethod
    def ranks(fusion, calibration, values):
        return calibration.rank(values) if fusion.rule == "rank" else None

    def forward(self, images):
        scores, maps = self.run_members(images)
        score, anomaly_map = self.fuse(scores, maps)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map, extras={"member_scores": scores})

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        for key in [key for key in state if key.startswith(MEMBERS)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict=True, assign=False):
        own = {key for key in self.state_dict()}
        found = set(state_dict)
        if strict and (own - found or found - own):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                               f"{sorted(own - found)}, unexpected keys {sorted(found - own)}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)
