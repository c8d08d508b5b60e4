# src/defectvad/components/warm_cosine_scheduler.py
# Dinomaly's learning rate: a linear warm-up from start_warmup_value to base_value over warmup_iters steps, then a
# cosine from base_value down to final_value at total_iters; final_value from there on
import numpy as np
from torch.optim.lr_scheduler import LRScheduler


def warm_cosine_schedule(base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0.0):
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))


class WarmCosineScheduler(LRScheduler):
    # every parameter group gets the schedule's value; last_epoch counts the scheduler's steps
    def __init__(self, optimizer, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0.0):
        self.final_value = final_value
        self.total_iters = total_iters
        self.schedule = warm_cosine_schedule(base_value, final_value, total_iters, warmup_iters, start_warmup_value)
        super().__init__(optimizer)

    def get_lr(self):
        index = self.last_epoch
        value = self.final_value if index >= self.total_iters else float(self.schedule[index])
        return [value for _ in self.optimizer.param_groups]
