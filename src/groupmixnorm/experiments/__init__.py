"""Runs as data, sweeps over methods and seeds, resumable result stores, tables and plots."""

from groupmixnorm.experiments.spec import RunSpec, execute, setting_label

__all__ = ["RunSpec", "execute", "setting_label"]
