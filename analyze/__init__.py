"""Analysis stage: scores, metrics and reports from caches, on CPU, without torch.

Nothing in this package imports torch, directly or indirectly (a test enforces it).
"""
