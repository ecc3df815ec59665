"""The torch engine: layer hooks (:mod:`.hooks`), scorers (:mod:`.scorers`), the policy compiler
(:mod:`.compile`) and the per-call run state (:mod:`.run`)."""
