"""The commands (click) and what they orchestrate: export and build, bulk sampling, serving."""
