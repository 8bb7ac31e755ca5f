"""The strategy-agnostic pruning kit: units, masks, trackers, scores, planner, slicing, streaming."""
