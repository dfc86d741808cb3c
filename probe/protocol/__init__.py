"""The probe protocol: which rows are train, validation and test, the search, and the metrics."""
