"""The parts of the trainer (:mod:`pipeline.train` runs them as a few named steps).

* :mod:`~pipeline.training.setup`: what defines a run (:class:`TrainSetup`) and :class:`TrainingError`;
* :mod:`~pipeline.training.device`: CUDA probing, the device line, AMP precision, cuDNN settings;
* :mod:`~pipeline.training.distributed`: the process group of a ``torchrun`` job and its collectives;
* :mod:`~pipeline.training.data`: train/validation split, validation pairs, batch layout, the batch
  source (decoded up front or per batch), the prefetching thread pool and the input conversion;
* :mod:`~pipeline.training.step`: network and loss as one module, the learning-rate schedule,
  validation embeddings and AUC;
* :mod:`~pipeline.training.checkpoint`: the per-epoch checkpoint and resuming from it (rank 0 decides),
  the saved model (stable bytes), loading it back.
"""
