"""The built-in scores, one module per detector (gradient scores here, post-hoc baselines
in ``baselines``). Each module registers its entries with ``register_score``, the same
public mechanism plugins use. The registry discovers the modules
(``analyze.registry.builtin_modules``): a new detector is one new module, nothing else."""
