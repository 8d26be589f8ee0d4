"""Certificate serial numbers as ``openssl x509 -serial`` prints them.

One spelling everywhere the agent shows a serial (logs, metadata, ``make demo``), so an operator
can grep a log for the serial ``openssl x509 -noout -serial`` shows for a pod's ``tls.crt``:
uppercase hex, whole bytes (a leading zero kept: ``0910448A…``, never ``910448ae…``).
"""

from __future__ import annotations


def format_serial(serial: int) -> str:
    """``0x910448ae`` -> ``910448AE``, ``0x1`` -> ``01``, ``0`` -> ``00``: the bytes of the
    ASN.1 INTEGER in uppercase hex, as OpenSSL's ``i2a_ASN1_INTEGER`` writes them."""
    sign = "-" if serial < 0 else ""
    digits = f"{abs(serial):X}"
    if len(digits) % 2:
        digits = "0" + digits
    return sign + digits
