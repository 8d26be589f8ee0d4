"""PKI primitives: keys, CSRs, certificate authorities and keystores.

No I/O beyond files the caller names.
"""
