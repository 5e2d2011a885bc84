"""dpo_ray: Direct Preference Optimization and its loss family, distributed on Ray."""

__all__ = ["Callback", "CallbackContext", "ConfigError", "DPOConfig", "load_config", "DPOTrainer"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported when asked for: the config pulls in pydantic and torch, the trainer Ray and transformers. A Ray
    # process that only unpickles a small actor of this package (dpo_ray.ledger) imports none of them.
    if name in ("ConfigError", "DPOConfig", "load_config"):
        import dpo_ray.config

        return getattr(dpo_ray.config, name)
    if name == "DPOTrainer":
        from dpo_ray.trainer import DPOTrainer

        return DPOTrainer
    if name in ("Callback", "CallbackContext"):
        import dpo_ray.train.callbacks

        return getattr(dpo_ray.train.callbacks, name)
    raise AttributeError(name)
