"""The teacher-cache format: manifest, codecs, writer, reader, verify."""
