"""A trained run as a standalone Hugging Face model folder (``folder.py``); ``configuration_imsm.py`` and
``modeling_imsm.py`` are the files that travel with it."""
