"""The sentence-transformers drop-in :func:`mine_hard_negatives`, its text corpus and negative search, and
the ``naics_hnm.mine`` command line. Imports tree/, index/, mining/, data/ and the top-level helpers."""
