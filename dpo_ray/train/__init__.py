"""What runs inside each Ray Train worker process: the training recipe (``loop``), its setup (``setup``), the
per-mode step (``steps``), checkpoints and the saved model (``checkpoint``), metrics (``metrics``, ``logger``)
and the learning-rate schedule (``schedule``). Nothing here starts Ray or reads the driver's files."""
