"""Stage 1: run the teacher once over a corpus and write the teacher cache."""
