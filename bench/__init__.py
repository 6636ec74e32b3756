"""medsynbench: what synthetic medical images are worth downstream."""

__version__ = "0.1.0"
