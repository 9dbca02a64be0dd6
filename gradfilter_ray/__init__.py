"""gradfilter-ray: GradFiltering (gradient signal-to-noise data selection) as a Ray job."""

__version__ = "0.1.0"
