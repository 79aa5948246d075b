"""Training loops of the ``train`` stage: block reconstruction (``blocks.py``)."""
