"""The experiment runner behind ``structsparse run``: recipes (:mod:`.recipe`), the training loop
(:mod:`.trainer`), the per-epoch log (:mod:`.runlog`) and multi-process training (:mod:`.distributed`).
Built on the public API only."""
