"""Generation and embedding engines: numpy + onnxruntime(-genai), nothing of HTTP or queues.

- ``base``      the GenerationEngine interface, SamplingParams, SequenceState (no runtime import)
- ``loader``    pick and load the engine a bundle needs
- ``ort``       the only importer of onnxruntime: providers, sessions, dtypes, its errors
- ``genai``     the only importer of onnxruntime-genai: GenaiEngine (the builder's graph)
- ``batch``     BatchDecoder: one onnxruntime run per step for every decoding genai sequence
- ``ort_loop``  OrtEngine: the numpy loop for optimum exports
- ``embed``     EmbeddingEngine: an encoder and the bundle's pooling
- ``sampling``  greedy / temperature / top-k / top-p on a row of logits
"""
