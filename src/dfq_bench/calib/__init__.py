"""Calibration sources (``data=``): noise and real images (``sources.py``, which registers every source
in ``SYNTH``), the BN-statistics generators on one base (``bnstats.py``: ZeroQ ``zeroq.py``, GENIE-D
``genie.py``) and the on-disk cache of generated sets (``cache.py``)."""
