"""Training a skipped model toward the full one: the data it trains on (:mod:`.data`) and distillation (:mod:`.distill`)."""
