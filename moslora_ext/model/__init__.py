"""Whole-model operations of the functional API: target selection (``targets``), adding, switching and
deleting adapters (``adapters``), merging (``merging``), mixed-adapter batches (``mixed_batch``) and the
checkpoint names of adapted models (``checkpoint_names``). Imports ``ops`` and ``layers``."""
