"""What runs inside each Ray Train worker process: the training recipe (``loop``), its setup (``setup``), the
per-mode step (``steps``), checkpoints and the saved model (``checkpoint``) and metrics (``metrics``,
``logger``); optimizers and schedules by name are ``dpo_ray.optim`` / ``dpo_ray.schedule``. Nothing here
starts Ray or reads the driver's files."""
