"""neco.export stage."""
