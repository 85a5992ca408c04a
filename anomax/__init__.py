"""anomax: industrial image anomaly detection in JAX."""
__version__ = "0.1.0"
