"""Training loop: Trainer and TrainingArguments."""

from recis.framework.trainer import Trainer, TrainingArguments

__all__ = ["Trainer", "TrainingArguments"]
