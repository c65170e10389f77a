"""neco.training stage."""
