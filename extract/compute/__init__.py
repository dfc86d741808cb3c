"""Running a network over batches: the engines, the input pipeline, CPU tuning."""
