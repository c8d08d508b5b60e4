# src/defectvad/components/dynamic_buffers.py
import torch
from torch import nn


class DynamicBufferMixin(nn.Module):
    # buffers filled by fitting start empty; loading a state dict takes the stored shapes
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buffer in list(self._buffers.items()):
            key = prefix + name
            if buffer is not None and key in state_dict and buffer.shape != state_dict[key].shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
