"""Integrity primitives of the container: checksums, erasure codes and voting.

:mod:`.checksum` (64-bit chunk hashes), :mod:`.gf256` (GF(2^8)
arithmetic), :mod:`.backends` (erasure-code implementations behind one
protocol), :mod:`.parity` (:class:`~.parity.ErasureCode`: k data + m
parity chunks per stripe), :mod:`.inner` (the Reed-Solomon code inside each
chunk; :mod:`.native` picks its compiled decoder or the numpy reference) and
:mod:`.vote` (majority over redundant copies). Pure functions
over bytes: they know nothing of files, tensors or codecs.
"""
