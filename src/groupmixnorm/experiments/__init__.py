"""Runs as data, sweeps over methods and seeds, resumable result stores, tables and plots."""

from groupmixnorm.experiments.spec import METRIC_KEYS, RunSpec, execute, setting_label

__all__ = ["METRIC_KEYS", "RunSpec", "execute", "setting_label"]
