"""File formats the registry ingests and serves: safetensors headers, PEFT adapter folders,
sharded indexes, manifests and fingerprints. Header-level only; tensor math is in
:mod:`registry.weights`."""
