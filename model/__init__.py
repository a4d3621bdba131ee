"""The DisCo model (see DESIGN.md)."""
