"""sevenpoint: seven-point checklist criteria and diagnosis from dermoscopy, clinical photo and metadata."""

__version__ = "0.1.0"

import os as _os

# albumentations asks PyPI for a newer version at import; clinics run offline.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
