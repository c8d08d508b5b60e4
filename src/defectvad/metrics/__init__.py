# src/defectvad/metrics/__init__.py
from defectvad.metrics.aupro import aupro, label_regions
from defectvad.metrics.auroc import auroc
from defectvad.metrics.average_precision import average_precision
from defectvad.metrics.evaluation import compute_metrics
from defectvad.metrics.f1_max import f1_max, f1_max_threshold
