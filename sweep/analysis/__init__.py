"""Which layers and which criterion? Per-layer sensitivity (`sweep sensitivity`) and criteria ranked against the
oracle loss change (`sweep criteria`), as parallel Ray jobs tracked in MLflow."""
