# src/defectvad/components/sequence_inn.py
from torch import nn


class SequenceINN(nn.Module):
    # FrEIA's SequenceINN: invertible blocks in a row, log-determinants summed; blocks live in
    # `module_list` so state-dict names match FrEIA's (e.g. module_list.0.global_scale)
    def __init__(self, *dims):
        super().__init__()
        self.shapes = [tuple(dims)]
        self.conditions = []
        self.module_list = nn.ModuleList()

    def append(self, module_class, cond=None, cond_shape=None, **kwargs):
        dims_in = [self.shapes[-1]]
        if cond is not None:
            kwargs["dims_c"] = [cond_shape]
        module = module_class(dims_in, **kwargs)
        self.conditions.append(cond)
        self.module_list.append(module)
        self.shapes.append(tuple(module.output_dims(dims_in)[0]))
        return self

    def __len__(self):
        return len(self.module_list)

    def __getitem__(self, index):
        return self.module_list[index]

    def forward(self, x, c=None, rev=False):
        order = range(len(self.module_list))
        log_det_jac = 0
        for index in reversed(order) if rev else order:
            condition = self.conditions[index]
            if condition is None:
                x, jac = self.module_list[index](x, rev=rev)
            else:
                x, jac = self.module_list[index](x, c=[c[condition]], rev=rev)
            log_det_jac = jac + log_det_jac
        return x, log_det_jac
