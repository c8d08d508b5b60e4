# src/defectvad/export/onnx_export.py
import json
import warnings

import torch
from torch import nn

from defectvad.errors import ExportError

OPSET = 17
TOLERANCE = 1e-4
OUTPUTS = ("pred_score", "anomaly_map")


class ScoreAndMap(nn.Module):
    # the model's evaluation contract as a pair of tensors, which is what an ONNX graph returns
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        outputs = self.model(image)
        return outputs["pred_score"].reshape(-1), outputs["anomaly_map"]


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("onnxruntime is needed to check the exported graph against PyTorch; "
                          "install it with pip install -e '.[onnx]'") from None
    return onnxruntime


def export_onnx(model, path, example, name="the model"):
    # the TorchScript exporter (dynamo=False): it needs neither onnxscript nor torch.export's tracing of
    # every Python branch; the batch axis is dynamic, the image size is the run's
    wrapper = ScoreAndMap(model.eval().cpu()).eval()
    axes = {"image": {0: "batch"}, "pred_score": {0: "batch"}, "anomaly_map": {0: "batch"}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), str(path), input_names=["image"], output_names=list(OUTPUTS),
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"{name} cannot be exported to ONNX: {reason}") from error
    return path


def add_metadata(path, metadata):
    import onnx

    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(graph, str(path))


@torch.no_grad()
def compare_with_torch(path, model, inputs):
    # largest absolute difference of each output between onnxruntime and PyTorch, and the outputs' scale
    onnxruntime = import_onnxruntime()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    found = session.run(list(OUTPUTS), {"image": inputs.numpy()})
    expected = ScoreAndMap(model.eval().cpu())(inputs)
    report = {}
    for name, ours, theirs in zip(OUTPUTS, found, expected):
        theirs = theirs.numpy()
        report[name] = {"max_abs_diff": float("inf"), "scale": float(abs(theirs).max()),
                        "shape": list(ours.shape), "expected_shape": list(theirs.shape)}
        if ours.shape == theirs.shape:
            report[name]["max_abs_diff"] = float(abs(ours - theirs).max())
    return report


def describe_report(report):
    parts = []
    for name, entry in report.items():
        if entry["shape"] != entry["expected_shape"]:
            parts.append(f"{name} has shape {tuple(entry['shape'])} instead of {tuple(entry['expected_shape'])}")
        else:
            parts.append(f"{name} max |diff| {entry['max_abs_diff']:.3g} (largest value {entry['scale']:.4g})")
    return ", ".join(parts)


def within_tolerance(report, tolerance=TOLERANCE):
    # absolute for outputs up to 1, relative to the output's largest value above that
    return all(entry["max_abs_diff"] <= tolerance * max(1.0, entry["scale"]) for entry in report.values())
