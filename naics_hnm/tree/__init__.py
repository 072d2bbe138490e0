"""The code tree: taxonomy, tree arrays, CSV and prefix loaders, the false-negative guard, curriculum ranges,
synthetic trees. Imports only the top-level helpers (:mod:`naics_hnm.fingerprint`, :mod:`naics_hnm.atomic`)."""
