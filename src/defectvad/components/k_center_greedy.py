# src/defectvad/components/k_center_greedy.py
import contextlib
import math
import sys

import torch
from tqdm import tqdm

from defectvad.components.sparse_random_projection import SparseRandomProjection
from defectvad.errors import ConfigError

# squared distances this close (relative) to the best one are re-checked with anomalib's own float32
# arithmetic, so rounding never decides a pick; the floor covers the float64 expansion's own error
TIE_TOLERANCE = 2.0**-18
TIE_FLOOR = 2.0**-36
MAX_TIE_CANDIDATES = 256
# elements of the (block x pending centres) product computed at once
CHUNK_ELEMENTS = 2**22


class KCenterGreedy:
    # anomalib's greedy k-center coreset on a sparse random projection (eps 0.9), picking the same indices
    def __init__(self, embedding, sampling_ratio, block_size=None, progress_bar=None, threads=None):
        check_sampling_ratio(sampling_ratio)
        self.embedding = embedding
        self.coreset_size = int(embedding.shape[0] * sampling_ratio)
        if self.coreset_size <= 0:
            raise ConfigError(
                f"a coreset sampling ratio of {sampling_ratio} keeps none of the {embedding.shape[0]} embeddings; "
                "raise model.coreset_sampling_ratio or train on more images"
            )
        self.model = SparseRandomProjection(eps=0.9)
        self.block_size = block_size
        self.progress_bar = progress_bar
        self.threads = threads
        self.features = None

    def project(self):
        if self.embedding.ndim == 2:
            self.model.fit(self.embedding)
            return self.model.transform(self.embedding)
        return self.embedding.reshape(self.embedding.shape[0], -1)

    def select_coreset_idxs(self, features=None, start_index=None):
        # features and start_index replace the projection and the random start, to compare with anomalib
        self.features = self.project() if features is None else features
        if start_index is None:
            start_index = torch.randint(high=self.features.shape[0], size=(1,), device=self.features.device).item()
        return select_k_centers(self.features, self.coreset_size, int(start_index), self.block_size,
                                self.progress_bar, self.threads)

    def sample_coreset(self):
        return self.embedding[self.select_coreset_idxs()]


def check_sampling_ratio(sampling_ratio):
    if not isinstance(sampling_ratio, (int, float)) or not 0 < sampling_ratio <= 1:
        raise ConfigError(f"model.coreset_sampling_ratio must be a number in (0, 1], got {sampling_ratio!r}")


def select_k_centers(features, count, start_index, block_size=None, progress_bar=None, threads=None):
    # Each pick is the point farthest from the centres so far (first index on ties). Every block of rows
    # keeps its running min squared distance and the count of centres it has seen; its stale max is an
    # upper bound, so only blocks that may hold the farthest point catch up, all pending centres in one
    # float64 product (precise enough that the expansion never decides a pick).
    features = features.float()
    n, dim = features.shape
    count = min(count, n)
    on_cpu = features.device.type == "cpu"
    if block_size is None:
        block_size = 2048 if on_cpu else n
    starts = list(range(0, n, block_size))
    # rows [x, 1] times centres [-2c, |c|^2] give |c|^2 - 2xc in a single product
    rows = torch.ones((n, dim + 1), dtype=torch.float64, device=features.device)
    rows[:, :dim] = features
    sq_norms = torch.einsum("ij,ij->i", rows[:, :dim], rows[:, :dim])
    floor = TIE_FLOOR * float(sq_norms.max())
    centers = rows.new_empty((count, dim + 1))
    min_sq = torch.full((n,), math.inf, dtype=torch.float64, device=features.device)
    applied = [0] * len(starts)
    block_max = [math.inf] * len(starts)
    selected = []

    def add_center(index):
        centers[len(selected), :dim] = rows[index, :dim] * -2
        centers[len(selected), dim] = sq_norms[index]
        selected.append(index)

    def update(block):
        lo, hi = starts[block], min(starts[block] + block_size, n)
        step = max(1, CHUNK_ELEMENTS // (hi - lo))
        for first in range(applied[block], len(selected), step):
            inner = rows[lo:hi] @ centers[first:min(first + step, len(selected))].T
            nearest = inner.amin(1).add_(sq_norms[lo:hi]).clamp_min_(0)
            torch.minimum(min_sq[lo:hi], nearest, out=min_sq[lo:hi])
        applied[block] = len(selected)
        block_max[block] = min_sq[lo:hi].max().item()

    def farthest():
        while True:
            best = max(block_max)
            block = block_max.index(best)
            if applied[block] < len(selected):
                update(block)
                continue
            tolerance = best * TIE_TOLERANCE + floor
            near = [b for b, value in enumerate(block_max) if value >= best - tolerance]
            stale = [b for b in near if applied[b] < len(selected)]
            if not stale:
                break
            for b in stale:
                update(b)
        candidates = torch.cat([
            torch.nonzero(min_sq[starts[b]:starts[b] + block_size] >= best - tolerance).flatten() + starts[b]
            for b in near
        ])
        if len(candidates) == 1:
            return candidates[0].item()
        if len(candidates) > MAX_TIE_CANDIDATES:
            # a mass of equal distances (duplicates once the coreset exceeds the distinct points)
            lo = starts[block]
            return lo + min_sq[lo:lo + block_size].argmax().item()
        picked = features[torch.tensor(selected, device=features.device)]
        exact = torch.stack([anomalib_min_distance(features[c], picked) for c in candidates])
        return candidates[exact.argmax()].item()

    disable = not sys.stderr.isatty() if progress_bar is None else not progress_bar
    # the per-pick products are small: on a CPU shared with other work, more threads mostly wait on each other
    with thread_count(threads if threads is not None else 1 if on_cpu else None):
        add_center(start_index)
        for _ in tqdm(range(count - 1), desc="coreset", leave=False, disable=disable, dynamic_ncols=True):
            index = farthest()
            min_sq[index] = 0
            block = index // block_size
            block_max[block] = min_sq[starts[block]:starts[block] + block_size].max().item()
            add_center(index)
    return selected


@contextlib.contextmanager
def thread_count(threads):
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def anomalib_min_distance(point, centers):
    # the distance as anomalib's KCenterGreedy rounds it: the norm of the difference
    return torch.linalg.norm(point - centers, ord=2, dim=1).min()
