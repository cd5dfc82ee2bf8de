"""igcam: weakly supervised semantic segmentation as a resumable command-line pipeline."""

__version__ = "0.1.0"
