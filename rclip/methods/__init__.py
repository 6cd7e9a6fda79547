"""The papers' methods and their baselines: ``cola`` (COLA), ``ttc`` (test-time counterattacks)."""
