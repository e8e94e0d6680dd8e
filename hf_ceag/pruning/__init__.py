"""Pruning: `magnitude` (masks and their enforcement), `schedule` (when to prune), `fairgrape` (the
group-aware importance baseline).
"""
