"""fmrilm: a Ray-distributed platform for a language-aligned fMRI foundation model."""

__version__ = "0.1.0"
