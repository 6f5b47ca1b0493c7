"""Media: what a file is (``sniff``), decoding a clip (``clip``: video, image sequence, image) and the image
helpers of preprocessing (``image``: modes, alpha keys, the clip's square crop). No stage logic, no models."""

from .sniff import SNIFF_BYTES, sniff, sniff_file

__all__ = ["sniff", "sniff_file", "SNIFF_BYTES"]
