"""flowar.runtime (see DESIGN.md)."""
