"""portwatch: who holds which listening port, and an alarm when a reserved one is taken."""

__version__ = "0.1.0"
# Here, not in portwatch.config: a view checks whether it exists without importing the YAML stack.
DEFAULT_CONFIG = "/etc/portwatch.yaml"
