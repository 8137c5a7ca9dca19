"""Benchmarks of the method, run as ``python -m slope_lightning.bench SUITE`` (see
``__main__``), one module per responsibility:

- ``common``: what every table records (machine, versions, command) and how it is written,
  row by row (:class:`~slope_lightning.bench.common.ResultsTable`);
- ``methods``: the training methods compared (dense, SLoPe, transposable 2:4), built alike;
- ``layers``, ``kernels``: one linear layer, and each Triton kernel against torch;
- ``step``: a whole-model training step; ``inference``: prefill and decode;
- ``memory``: model state and peak memory; ``runs``: finished training runs side by side;
- ``plot``: PNG bar charts; ``archive``: unpacking and rendering a GPU check's archive.

Timing is :func:`slope_lightning.utils.median_ms` everywhere.
"""
