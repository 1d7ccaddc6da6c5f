"""cos-customizer: customize Container-Optimized OS disk images."""

__version__ = "0.1.0"
