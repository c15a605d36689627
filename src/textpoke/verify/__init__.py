# SPDX-License-Identifier: GPL-2.0-only
"""Verification tools above the backends: exhaustive exploration
(``_explore``), schedule timelines (``_timeline``), reports (``_report``)
and campaigns on a cluster (``_cluster``)."""

from ._explore import Bound, ExploreResult, explore, replay_path

__all__ = ["Bound", "ExploreResult", "explore", "replay_path"]
