# src/defectvad/metrics/efficiency.py
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from defectvad.engine.devices import autocast

FLOPS_NOTE = ("torch.utils.flop_counter.FlopCounterMode on one evaluation forward at batch 1: convolutions and "
              "matrix products (a memory-bank search or Mahalanobis distance counts as matmuls, attention as its "
              "projections and its two products), 2 per multiply-add; element-wise ops, softmax, pooling, "
              "interpolation and sorting are not counted")


def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # scaled_dot_product_attention on a CPU, which torch's counter has no formula for: its two matrix products
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def fused_multi_head_attention_flops(query_shape, key_shape, value_shape, embed_dim, *args, out_shape=None,
                                     **kwargs):
    # nn.MultiheadAttention's fused inference path (batch first): the query, key, value and output projections
    # and the two attention products, none of which torch's counter sees inside the fused op
    batch, length, _ = query_shape
    source = key_shape[1]
    projections = 2 * batch * embed_dim * embed_dim * (2 * length + 2 * source)
    return projections + 4 * batch * length * source * embed_dim


ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._native_multi_head_attention: fused_multi_head_attention_flops,
}


def measure_peak_rss_mb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def count_parameters(module):
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in module.buffers())
    return {"total": total, "trainable": trainable, "buffer_elements": buffers}


@torch.no_grad()
def count_flops(model, images):
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
        model(images)
    model.train(was_training)
    return int(counter.get_total_flops())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(model, images, device, precision, warmup, repeats):
    # seconds of each timed forward, after `warmup` untimed ones
    times = []
    for index in range(warmup + repeats):
        synchronize(device)
        started = time.perf_counter()
        with autocast(device, precision):
            model(images)
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def repeat_to_batch(images, batch_size):
    copies = -(-batch_size // images.shape[0])
    return images.repeat(copies, 1, 1, 1)[:batch_size]


def measure_efficiency(model, images, device, precision="fp32", warmup=2, latency_repeats=5, batch_size=16,
                       throughput_repeats=2):
    # images: a few real inputs (C, H, W as the model sees them); every model is measured the same way, but a
    # batch-level model (model.batch_level, MuSc) scores a set of images against each other and never one alone:
    # its latency and FLOPs are those of one forward over the batch of batch_size images, per image
    model.eval()
    images = images.to(device)
    batch = repeat_to_batch(images, batch_size)
    batch_level = getattr(model, "batch_level", False)
    single = batch if batch_level else images[:1]
    latency = time_forward(model, single, device, precision, warmup, latency_repeats)
    if batch_level:
        # the same forwards: the throughput is the set's size over each forward's time
        throughput = latency[:max(1, throughput_repeats)]
        latency = [seconds / batch_size for seconds in latency]
    else:
        throughput = time_forward(model, batch, device, precision, warmup, throughput_repeats)
    return {
        "parameters": count_parameters(model),
        "flops_per_image": count_flops(model, single) // single.shape[0],
        "flops_note": (FLOPS_NOTE.replace("at batch 1", f"over a set of {batch_size} images, per image "
                                                        f"(batch-level model)") if batch_level else FLOPS_NOTE),
        "input_shape": list(single.shape[1:]),
        "latency_ms": round(statistics.median(latency) * 1000, 3),
        "latency": {"batch_size": single.shape[0], "warmup": warmup, "repeats": latency_repeats,
                    "statistic": "median time of one forward over the set / set size" if batch_level else "median"},
        "throughput_images_per_s": round(batch_size * len(throughput) / sum(throughput), 2),
        "throughput": {"batch_size": batch_size, "warmup": warmup, "repeats": len(throughput),
                       "statistic": "images / total time of the repeats"},
        "device": str(device),
        "precision": precision,
    }
