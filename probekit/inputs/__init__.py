"""Images in: paths, folders, PIL images, tensors and arrays (:mod:`probekit.inputs.images`) and
labelled sources (:mod:`probekit.inputs.sources`: class folders, manifests, WebDataset shards,
Hugging Face datasets), decoded batch by batch.
"""
