"""What two mergeswarm peers must agree on: ids, identities, formats and codecs.

Everything here is pure and deterministic across machines; no module does
anything at import time beyond defining names.
"""
