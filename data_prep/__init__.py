"""data_prep: WebDataset pixel shards from image corpora, cached latents / text embeddings, subspace fits."""
