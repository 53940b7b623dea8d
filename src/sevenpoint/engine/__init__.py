"""Engine: training (Lightning), evaluation, metrics and reports."""
