"""The edit engine: ablation plans and the orthogonalization math (``orthogonalize``), strength
schedules over layers (``strength_schedule``), applying a plan to a loaded model (``in_memory``),
applying and reverting it exactly (``revertible_edit``), and dense twins of quantized layers for
compute (``dense_twins``)."""
