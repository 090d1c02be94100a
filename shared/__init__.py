"""The small module every algorithm script shares: suites and env construction, normalisers,
evaluation, logging, checkpoints, parameter counting, report. No algorithm logic lives here."""
