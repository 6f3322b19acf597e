"""Opening what is sampled from: a checkpoint (eager) or an engine directory (the runtime)."""
