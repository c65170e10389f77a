"""neco.client stage."""
