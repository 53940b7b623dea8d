"""sevenpoint: seven-point checklist criteria and diagnosis from dermoscopy, clinical photo and metadata."""

__version__ = "0.1.0"
