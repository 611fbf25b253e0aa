"""zephyr-ray: the Zephyr recipe (dSFT -> AI feedback -> dDPO -> serve) on Ray Data, Ray Train and Ray Serve."""

__version__ = "0.1.0"
