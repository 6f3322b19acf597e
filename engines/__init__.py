"""flowar.engines (see DESIGN.md)."""
