"""Export a fitted scikit-learn classifier to ONNX with the stimloop contract in its metadata.

The graph has one input ``features`` (float32, ``(N, n_features)``) and one
output ``p_seizure`` (float32, ``(N, 1)``): the positive-class column of the
skl2onnx probability output (``zipmap=False``); the label output is removed
so the runtime computes nothing the controller does not use.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from controller.inference import CONTRACT_KEY, ModelContract

__all__ = ["to_onnx_model", "export_onnx"]


def to_onnx_model(estimator, contract: ModelContract, target_opset: int = 17):
    """Convert ``estimator`` (``predict_proba`` with classes [0, 1]) to an ``onnx.ModelProto`` carrying ``contract``."""
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    classes = list(getattr(estimator, "classes_", []))
    if classes != [0, 1]:
        raise ValueError(f"estimator must be a binary classifier with classes [0, 1], got {classes}")
    model = to_onnx(estimator, initial_types=[(contract.input_name, FloatTensorType([None, contract.n_features]))],
                    options={id(estimator): {"zipmap": False}}, target_opset={"": target_opset, "ai.onnx.ml": 3})
    graph = model.graph
    prob_out = [o for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT]
    if len(prob_out) != 1:
        raise ValueError(f"expected one float probability output, got {[o.name for o in graph.output]}")
    prob_name = prob_out[0].name
    # p_seizure = probabilities[:, 1:2]
    inits = [helper.make_tensor("ps_starts", TensorProto.INT64, [1], [1]),
             helper.make_tensor("ps_ends", TensorProto.INT64, [1], [2]),
             helper.make_tensor("ps_axes", TensorProto.INT64, [1], [1])]
    graph.initializer.extend(inits)
    graph.node.append(helper.make_node("Slice", [prob_name, "ps_starts", "ps_ends", "ps_axes"], [contract.output],
                                       name="p_seizure_slice"))
    while len(graph.output):
        graph.output.pop()
    graph.output.append(helper.make_tensor_value_info(contract.output, TensorProto.FLOAT, [None, 1]))
    # Drop nodes that only fed the removed label output.
    needed, keep = {contract.output}, []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = CONTRACT_KEY, contract.to_json()
    model.producer_name = "stimloop.models.seizure"
    model.doc_string = f"stimloop seizure detector {contract.version}"
    onnx.checker.check_model(model)
    return model


def export_onnx(estimator, contract: ModelContract, path: str | Path, check_X: np.ndarray | None = None) -> str:
    """Write the ONNX file and ``<path>.sha256``; return the sha256.

    With ``check_X`` the exported model is run in onnxruntime and compared
    with ``estimator.predict_proba`` (raises if they differ by > 1e-4).
    """
    import onnx

    path = Path(path)
    model = to_onnx_model(estimator, contract)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = model.SerializeToString()
    path.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    if check_X is not None:
        from controller.inference import OnnxPredictor

        pred = OnnxPredictor(path).predict_batch(check_X)
        ref = estimator.predict_proba(np.asarray(check_X, dtype=np.float32))[:, 1]
        err = float(np.max(np.abs(pred - ref))) if len(ref) else 0.0
        if err > 1e-4:
            raise RuntimeError(f"ONNX export of {path} differs from scikit-learn by {err:.2e} (> 1e-4)")
    onnx.load(str(path))  # round-trip: the file on disk parses
    return digest
