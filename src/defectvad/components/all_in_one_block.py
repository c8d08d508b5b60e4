# src/defectvad/components/all_in_one_block.py
import torch
from torch import nn
from torch.nn import functional as F

# the 1x1 "permutation" for inputs of rank 0 (vectors), 1, 2 and 3 (after the channel axis)
PERMUTE_FUNCTIONS = {0: F.linear, 1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def sigmoid_scale(x):
    return 10 * torch.sigmoid(x - 2.0)


def softplus_scale(x):
    return 0.1 * F.softplus(x, beta=0.5)


def exp_scale(x):
    return torch.exp(x)


def initial_global_scale(global_affine_type, global_affine_init):
    # the raw parameter value whose activation equals global_affine_init
    init = torch.tensor(float(global_affine_init))
    if global_affine_type == "SIGMOID":
        return 2.0 - torch.log(10.0 / init - 1.0), sigmoid_scale
    if global_affine_type == "SOFTPLUS":
        return 2.0 * torch.log(torch.exp(0.5 * 10.0 * init) - 1), softplus_scale
    if global_affine_type == "EXP":
        return torch.log(init), exp_scale
    raise ValueError(f"global_affine_type must be SIGMOID, SOFTPLUS or EXP, got {global_affine_type!r}")


def random_rotation(channels):
    # a Haar-random matrix of SO(n): QR of a Gaussian matrix with the signs of R's diagonal taken out
    q, r = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def random_permutation(channels):
    w = torch.zeros(channels, channels)
    w[torch.arange(channels), torch.randperm(channels)] = 1.0
    return w


class AllInOneBlock(nn.Module):
    # FrEIA's all-in-one flow step: affine coupling with a tanh-clamped log-scale, a learned global
    # affine (ActNorm-like) and a fixed channel permutation (hard, or a random rotation when soft).
    # dims_in is [(channels, *spatial)], dims_c the shapes of the conditions, concatenated to the
    # subnet's input. forward returns (output, log|det J|) per sample; rev=True inverts.
    def __init__(self, dims_in, dims_c=None, subnet_constructor=None, affine_clamping=2.0, gin_block=False,
                 global_affine_init=1.0, global_affine_type="SOFTPLUS", permute_soft=False,
                 reverse_permutation=False):
        super().__init__()
        dims_c = list(dims_c or [])
        channels, *spatial = dims_in[0]
        self.input_rank = len(spatial)
        if self.input_rank not in PERMUTE_FUNCTIONS:
            raise ValueError(f"inputs must have 1 to 4 dimensions, got {1 + self.input_rank}")
        if any(tuple(dims[1:]) != tuple(spatial) for dims in dims_c):
            raise ValueError(f"condition shapes {dims_c} do not match the input shape {dims_in}")
        if subnet_constructor is None:
            raise ValueError("AllInOneBlock needs a subnet_constructor(channels_in, channels_out)")
        self.sum_dims = tuple(range(1, 2 + self.input_rank))
        self.conditional = len(dims_c) > 0
        self.condition_channels = sum(dims[0] for dims in dims_c)
        self.splits = [channels - channels // 2, channels // 2]
        self.permute_function = PERMUTE_FUNCTIONS[self.input_rank]
        self.in_channels = channels
        self.clamp = affine_clamping
        self.gin = gin_block
        self.reverse_pre_permute = reverse_permutation

        scale, self.global_scale_activation = initial_global_scale(global_affine_type, global_affine_init)
        shape = (1, channels, *([1] * self.input_rank))
        self.global_scale = nn.Parameter(torch.ones(shape) * scale)
        self.global_offset = nn.Parameter(torch.zeros(shape))
        w = random_rotation(channels) if permute_soft else random_permutation(channels)
        kernel = (channels, channels, *([1] * self.input_rank))
        self.register_buffer("w_perm", w.reshape(kernel))
        self.register_buffer("w_perm_inv", w.T.contiguous().reshape(kernel))
        self.subnet = subnet_constructor(self.splits[0] + self.condition_channels, 2 * self.splits[1])

    @staticmethod
    def output_dims(input_dims):
        return input_dims

    def global_affine(self, x, rev=False):
        if self.gin:
            scale, log_jac = 1.0, 0.0
        else:
            scale = self.global_scale_activation(self.global_scale)
            log_jac = torch.sum(torch.log(scale))
        if rev:
            return (self.permute_function(x, self.w_perm_inv) - self.global_offset) / scale, log_jac
        return self.permute_function(x * scale + self.global_offset, self.w_perm), log_jac

    def affine(self, x, a, rev=False):
        a = a * 0.1
        channels = x.shape[1]
        log_scale = self.clamp * torch.tanh(a[:, :channels])
        if self.gin:
            log_scale = log_scale - torch.mean(log_scale, dim=self.sum_dims, keepdim=True)
        if rev:
            return (x - a[:, channels:]) * torch.exp(-log_scale), -torch.sum(log_scale, dim=self.sum_dims)
        return x * torch.exp(log_scale) + a[:, channels:], torch.sum(log_scale, dim=self.sum_dims)

    def forward(self, x, c=None, rev=False):
        if rev:
            x, global_log_jac = self.global_affine(x, rev=True)
        elif self.reverse_pre_permute:
            x = self.permute_function(x, self.w_perm_inv)

        x1, x2 = torch.split(x, self.splits, dim=1)
        a = self.subnet(torch.cat([x1, *c], 1) if self.conditional else x1)
        x2, log_jac_det = self.affine(x2, a, rev=rev)
        out = torch.cat((x1, x2), 1)

        if not rev:
            out, global_log_jac = self.global_affine(out)
        elif self.reverse_pre_permute:
            out = self.permute_function(out, self.w_perm)
        # the global scale acts on every position of every channel
        positions = out[0, :1].numel()
        log_jac_det = log_jac_det + (-1) ** rev * positions * global_log_jac
        return out, log_jac_det
