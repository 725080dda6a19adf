"""What lives in the tracking store: finding train runs (lookup), the ensemble fit over their out-of-fold logits (ensemble), and the registered pyfunc model (registry)."""
