"""neco.serving stage."""
