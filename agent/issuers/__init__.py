"""Issuers: the local CA and cert-manager backends behind one interface (``base.Issuer``)."""
