"""Sweeps: heads x stages x seeds on cached features, with robustness, statistics and reports."""
