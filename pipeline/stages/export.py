"""``python -m pipeline export``: the model file as ONNX, with its box decoding, checked with onnxruntime.

``--model`` (``models/ssd.pt``, or a registered model ``models:/NAME@ALIAS``) is exported to ``--out``
(``models/ssd.onnx``) at ``--opset`` (17); with ``--nms`` the graph ends in ONNX ``NonMaxSuppression`` with
the ``params.eval`` thresholds (see ``pipeline.artifacts.onnx_export`` for inputs, outputs and the exact NMS
semantics). Before anything is written the model passes ``onnx.checker`` and onnxruntime (CPU) is compared
with PyTorch on random images: max |diff| within ``Tolerance`` for boxes and scores and, with ``--nms``, the
same selected indices as ``ssd_core``'s NMS. Then the ``.onnx`` is written atomically, and ``<out>.json``
describes it (names, shapes, side, classes, mean/std, opset, tolerance, measured differences).

Exit status: 0 written; 1 the check failed (nothing written); 2 unusable arguments or model file.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pipeline.artifacts.atomic_write import write_bytes_atomic
from pipeline.artifacts.onnx_export import NmsSettings, check_opset, export_onnx, metadata
from pipeline.artifacts.onnx_verify import Tolerance, sidecar, verify_onnx
from pipeline.config import Params
from pipeline.stages.predict import load_model
from pipeline.tracking.uris import TrackingError

logger = logging.getLogger(__name__)


def sidecar_path(out: Path) -> Path:
    """``models/ssd.onnx`` -> ``models/ssd.onnx.json``."""
    return out.with_name(out.name + ".json")


def main(args: argparse.Namespace, params: Params) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    if args.format != "onnx":
        logger.error("export: unknown format %r; expected 'onnx'", args.format)
        return 2
    try:
        opset = check_opset(args.opset)
        loaded = load_model(args.model, params)
    except (FileNotFoundError, ValueError, TrackingError) as error:
        logger.error("export: %s", error)
        return 2
    cfg = params.eval
    nms = NmsSettings.from_eval(cfg.score_threshold, cfg.nms_iou, cfg.top_k, cfg.max_detections) if args.nms else None
    logger.info(
        "exporting %s (%s, %d classes, %dx%d input) to ONNX opset %d%s",
        args.model,
        loaded.preset,
        len(loaded.classes),
        loaded.model.image_size,
        loaded.model.image_size,
        opset,
        f" with NMS {dict(nms._asdict())}" if nms else "",
    )
    proto = export_onnx(loaded.model, opset=opset, nms=nms, metadata=metadata(loaded.model, loaded.classes))
    data = proto.SerializeToString()
    tolerance = Tolerance()
    check = verify_onnx(data, loaded.model, nms)
    diffs = f"max |diff| boxes {_short(check.max_diff_boxes)} scores {_short(check.max_diff_scores)}"
    if not check.within(tolerance):
        nms_note = "" if check.selected_match is not False else "; selected_indices differ from ssd_core's NMS"
        logger.error(
            "export: onnxruntime disagrees with PyTorch on %d sample images: %s (tolerance boxes %g, "
            "scores %g)%s; nothing written",
            check.batch_size,
            diffs,
            tolerance.boxes,
            tolerance.scores,
            nms_note,
        )
        return 1
    write_bytes_atomic(out, data)
    info = sidecar(
        loaded.model,
        loaded.classes,
        opset=opset,
        nms=nms,
        max_detections=cfg.max_detections if nms else None,
        tolerance=tolerance,
        verification=check,
        size_bytes=len(data),
    )
    info["source_model"] = str(args.model)
    write_bytes_atomic(sidecar_path(out), (json.dumps(info, indent=2) + "\n").encode())
    nms_note = f", NMS selected {check.num_selected} boxes as ssd_core does" if nms else ""
    logger.info("export: %s (%.1f MB, opset %d), %s%s", out, len(data) / 1e6, opset, diffs, nms_note)
    logger.debug("export took %.1f s", time.perf_counter() - started)
    return 0


def _short(value: float) -> str:
    """One significant digit: 2.3e-06 -> '2e-6', 0 -> '0'."""
    mantissa, _, exponent = f"{value:.0e}".partition("e")
    return "0" if value == 0 else f"{mantissa}e{int(exponent)}"
