"""The DTDR container: the byte layout docs/format.md specifies, written and read.

:mod:`.constants` holds the magic numbers, limits and struct layouts;
:mod:`.records` the record and section framing; :mod:`.index` the tensor
index (what each tensor is and where its records lie); :mod:`.layout` the
chunk and stripe geometry; :mod:`.writer` streams records into a storage
sink with checksums and parity; :mod:`.reader` reads them back from a
storage source, verifying every chunk and repairing what parity allows. It
knows bytes, records and sections, never what a codec does with them.
"""
