"""Quality of derived models on real tasks (8×8 digits bundled with scikit-learn).

Entry point: ``python -m bench.quality.run`` (see :mod:`bench.quality.run`).
"""
