from recis.utils.logger import Logger

__all__ = ["Logger"]
