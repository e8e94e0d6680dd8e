"""The method: one constraint per group on the excess accuracy gap ψ_g, as Cooper problems.

`problems` (CEAG and equalized-loss problems), `gaps` (the ψ_g formula), `reference` (the dense model's per-group
statistics), `replay_buffer` (per-group estimates), `state` (what a checkpoint adds for a resumed run).
"""
