# src/defectvad/components/nearest_neighbors.py
import torch

# elements of one (queries x bank rows) distance block: 64 MiB in float32, whatever the sizes
BLOCK_ELEMENTS = 2**24
MAX_QUERIES = 1024
MIN_QUERIES = 64


def squared_norms(x):
    return x.pow(2).sum(dim=-1, keepdim=True)


def squared_distances(x, y, x_sq=None, y_sq=None):
    # anomalib's arithmetic, ||x||^2 - 2xy + ||y||^2 in this order, batched over leading dims
    x_sq = squared_norms(x) if x_sq is None else x_sq
    y_sq = squared_norms(y) if y_sq is None else y_sq
    res = torch.matmul(x, y.transpose(-2, -1))
    res.mul_(-2)
    res.add_(x_sq)
    res.add_(y_sq.transpose(-2, -1))
    return res


def euclidean_dist(x, y):
    return squared_distances(x, y).clamp_min_(0).sqrt_()


def nearest_neighbors(queries, bank, k=1, bank_sq=None, block_elements=BLOCK_ELEMENTS):
    # distances and indices (queries, k) of the k nearest bank rows, nearest first, in float32.
    # Queries and bank are taken in blocks so no queries x bank matrix is ever held whole.
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in 1..{bank.shape[0]}, got {k}")
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        bank_sq = squared_norms(bank) if bank_sq is None else bank_sq.float().reshape(-1, 1)
        if torch.jit.is_tracing():
            # ONNX export: one block, since a traced loop would keep the trace's batch size
            block = squared_distances(queries, bank, None, bank_sq)
            distances, indices = block.topk(k, dim=1, largest=False)
            return distances.clamp_min(0).sqrt(), indices
        n_queries, n_bank = queries.shape[0], bank.shape[0]
        query_step = max(1, min(n_queries, MAX_QUERIES, max(MIN_QUERIES, block_elements // n_bank)))
        bank_step = min(n_bank, max(k, block_elements // query_step))
        distances = queries.new_empty((n_queries, k))
        indices = torch.empty((n_queries, k), dtype=torch.long, device=queries.device)
        for first in range(0, n_queries, query_step):
            chunk = queries[first:first + query_step]
            chunk_sq = squared_norms(chunk)
            best, where = None, None
            for start in range(0, n_bank, bank_step):
                block = squared_distances(chunk, bank[start:start + bank_step], chunk_sq, bank_sq[start:start + bank_step])
                if k == 1:
                    values, found = block.min(1, keepdim=True)
                else:
                    values, found = block.topk(min(k, block.shape[1]), dim=1, largest=False)
                found += start
                if best is None:
                    best, where = values, found
                elif k == 1:
                    # strictly closer only, so ties keep the lower index as a single pass would
                    closer = values < best
                    best, where = torch.where(closer, values, best), torch.where(closer, found, where)
                else:
                    best, order = torch.cat((best, values), 1).topk(k, dim=1, largest=False)
                    where = torch.cat((where, found), 1).gather(1, order)
            distances[first:first + query_step] = best.clamp_min_(0).sqrt_()
            indices[first:first + query_step] = where
    return distances, indices
