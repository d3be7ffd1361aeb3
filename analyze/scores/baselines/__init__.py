"""Post-hoc baselines, one module per detector, all computed from cached arrays."""
