"""Recompute a Phalanx model's predictions with safetensors + numpy only.

Usage: predict_numpy.py MODEL.safetensors ROWS.csv
Prints a JSON list: class indices (classifiers) or values in the target's units (regression).
Reads everything it needs from the file's metadata: the model spec, the feature names, the
standardisation of the training rows, the target's scale.
"""
import csv
import json
import sys

import numpy as np
from safetensors import safe_open


def main(model_path, csv_path):
    with safe_open(model_path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert meta["format"] == "phalanx-model-1", meta["format"]
    spec = json.loads(meta["model_spec"])
    features = meta["feature_names"].split(",")
    mean = np.array(json.loads(meta["feature_mean"]), dtype=np.float64)
    std = np.array(json.loads(meta["feature_std"]), dtype=np.float64)

    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [[float(r[name]) for name in features] for r in reader]
    x = np.array(rows, dtype=np.float32)
    # The same arithmetic as training: f64 subtraction and division, rounded to f32.
    x = ((x.astype(np.float64) - mean) / std).astype(np.float32)

    kind = spec["kind"]
    if kind == "linear":
        out = x @ tensors["weight"].reshape(-1, 1) + tensors["bias"]
    elif kind == "softmax":
        out = x @ tensors["weight"] + tensors["bias"]
    elif kind == "mlp":
        hidden = np.maximum(x @ tensors["w1"] + tensors["b1"], 0.0)
        out = hidden @ tensors["w2"] + tensors["b2"]
    else:
        raise SystemExit(f"unknown model kind {kind}")

    if spec["head"] == "classification":
        result = [int(i) for i in np.argmax(out, axis=1)]
    else:
        y = out[:, 0].astype(np.float64)
        if "target_mean" in meta:
            y = y * float(meta["target_std"]) + float(meta["target_mean"])
        result = [float(v) for v in y]
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
