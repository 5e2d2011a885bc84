"""dpo_ray: Direct Preference Optimization and its loss family, distributed on Ray."""

from dpo_ray.config import ConfigError, DPOConfig, load_config

__all__ = ["ConfigError", "DPOConfig", "load_config", "DPOTrainer"]
__version__ = "0.1.0"


def __getattr__(name):
    # The trainer pulls in Ray and transformers; import it only when asked for.
    if name == "DPOTrainer":
        from dpo_ray.trainer import DPOTrainer

        return DPOTrainer
    raise AttributeError(name)
