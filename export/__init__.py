"""flowar.export (see DESIGN.md)."""
