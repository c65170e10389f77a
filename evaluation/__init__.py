"""neco.evaluation stage."""
