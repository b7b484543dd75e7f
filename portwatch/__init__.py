"""portwatch: who holds which listening port, and an alarm when a reserved one is taken."""

__version__ = "0.1.0"
