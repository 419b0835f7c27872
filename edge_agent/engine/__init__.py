"""Generation and embedding engines: numpy + onnxruntime(-genai), nothing of HTTP or queues.

- ``base``      the GenerationEngine interface, SamplingParams, SequenceState (no runtime import)
- ``loader``    pick and load the engine a bundle needs
- ``ort``       the only importer of onnxruntime: providers, sessions, dtypes, its errors
- ``batch``     BatchEngine: genai bundles on CPU, one onnxruntime session for every sequence
                (chunked prefill, prefix cache, one run per decode step for all of them)
- ``prefix_cache``  the KV of prompt prefixes in hashed blocks, LRU under a byte budget
- ``genai``     the only importer of onnxruntime-genai: GenaiEngine (genai bundles on GPUs)
- ``ort_loop``  OrtEngine: the numpy loop for optimum exports
- ``embed``     EmbeddingEngine: an encoder and the bundle's pooling
- ``sampling``  greedy / temperature / top-k / top-p on a row of logits
"""
