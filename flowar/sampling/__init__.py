"""Sampling: the schedule (data built before the loop), the one sampler loop, eager stages, batches."""
