"""mgit_fast inside other libraries' models and trainers: ``huggingface`` (transformers'
attention registry) and ``lightning`` (``MGiTModule``, a LightningModule)."""
