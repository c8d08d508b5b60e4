# src/defectvad/models/autoencoder/loss.py
from torch import nn


class AutoencoderLoss(nn.Module):
    def forward(self, target, reconstruction):
        return (target - reconstruction).pow(2).mean()


class VaeLoss(nn.Module):
    # the negative ELBO of a Gaussian decoder with variance beta / 2, divided by (number of target values / beta):
    # mean squared error + beta * KL per target value. beta=1 is the textbook unit-variance decoder;
    # smaller values ask for sharper reconstructions (beta=0.01: a noise std of about 0.07)
    def __init__(self, beta=0.01):
        super().__init__()
        self.beta = beta

    def kl_divergence(self, mu, logvar):
        # KL(N(mu, exp(logvar)) || N(0, 1)), summed over the latent, per image
        return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)

    def forward(self, target, reconstruction, mu, logvar):
        values = target[0].numel()
        reconstruction_error = (target - reconstruction).pow(2).mean()
        return reconstruction_error + self.beta * self.kl_divergence(mu, logvar).mean() / values
