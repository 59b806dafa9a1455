"""kdpipe: offline knowledge distillation for large language models.

Stage 1 (`kdpipe extract`) runs the teacher once and writes its signals into a Zarr v3 teacher cache;
stage 2 (`kdpipe distill`) trains students from that cache alone.
"""

__version__ = "0.7.0"
