"""`neco.demo`: the end-to-end demo, the one place that composes every stage (`neco demo`)."""
