"""What every other part of centerkern stands on, and which imports nothing above it.

- ``errors``: SPEC's message for a bad label, ``BackendUnavailableError``, ``PeerInputError``;
- ``rules``: the three published rules reduced to their coefficients;
- ``interop``: reading any framework's array as NumPy or device memory, without a copy;
- ``validation``: every check of SPEC's error table, before any backend runs.
"""
