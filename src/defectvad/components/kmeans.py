# src/defectvad/components/kmeans.py
import torch


class KMeans:
    # Lloyd's k-means from random rows, stopping when the labels no longer change (anomalib's)
    def __init__(self, n_clusters, max_iter=10):
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.cluster_centers_ = None
        self.labels_ = None

    def fit(self, inputs):
        start = torch.randint(0, inputs.shape[0], (self.n_clusters,))
        self.cluster_centers_ = inputs[start.to(inputs.device)].clone()
        previous = None
        for _ in range(self.max_iter):
            self.labels_ = self.predict(inputs)
            if previous is not None and torch.equal(self.labels_, previous):
                return self.labels_, self.cluster_centers_
            previous = self.labels_.clone()
            counts = torch.bincount(self.labels_, minlength=self.n_clusters)
            # half-precision inputs are summed in float32
            dtype = torch.float32 if inputs.dtype in (torch.float16, torch.bfloat16) else inputs.dtype
            sums = torch.zeros_like(self.cluster_centers_, dtype=dtype)
            sums.index_add_(0, self.labels_, inputs.to(sums.dtype))
            # an empty cluster keeps its centre
            filled = counts > 0
            self.cluster_centers_[filled] = (sums[filled] / counts[filled].unsqueeze(1).to(sums.dtype)).to(inputs.dtype)
        self.labels_ = self.predict(inputs)
        return self.labels_, self.cluster_centers_

    def predict(self, inputs):
        return torch.argmin(torch.cdist(inputs, self.cluster_centers_), dim=1)
