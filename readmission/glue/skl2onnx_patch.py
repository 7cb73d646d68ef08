"""Reach-in: fix skl2onnx's HistGradientBoosting conversion (`tree_ensemble.add_node`).

skl2onnx 1.20 passes a Python bool (False, for leaves) as the ONNX int attribute
`nodes_missing_value_tracks_true` when converting HistGradientBoosting trees, which onnx
refuses ("Expected an int, got a boolean"). The patch wraps the module-level `add_node` to
coerce the flag to int.

Contract: `patch_hist_gradient_boosting()` is idempotent and returns True when the patch is in
place. Checked against skl2onnx 1.20.x; with another version, or without `add_node`, it warns
once and leaves skl2onnx as it is (its public behaviour: that version's converter as shipped).
"""

from __future__ import annotations

from typing import Any

from readmission.glue.versions import checked, warn_once

CHECKED_RANGE = ((1, 20), (1, 21))  # skl2onnx versions the patch was checked against
_WHAT = "skl2onnx tree_ensemble.add_node patch"


def patch_hist_gradient_boosting() -> bool:
    """Coerce `nodes_missing_value_tracks_true` to int in skl2onnx's tree conversion."""
    if not checked("skl2onnx", *CHECKED_RANGE, _WHAT):
        return False
    from skl2onnx.common import tree_ensemble

    original = getattr(tree_ensemble, "add_node", None)
    if original is None or not callable(original):
        warn_once(_WHAT, "skl2onnx.common.tree_ensemble has no add_node")
        return False
    if getattr(original, "_readmission_patched", False):
        return True

    def add_node(*args: Any, **kwargs: Any) -> Any:
        if "nodes_missing_value_tracks_true" in kwargs:
            kwargs["nodes_missing_value_tracks_true"] = int(
                kwargs["nodes_missing_value_tracks_true"]
            )
        return original(*args, **kwargs)

    add_node._readmission_patched = True  # type: ignore[attr-defined]
    tree_ensemble.add_node = add_node
    return True
