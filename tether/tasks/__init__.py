"""The built-in models and data sets, and the one place a run's model and data are built."""
