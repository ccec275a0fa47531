"""Models: the MAE itself (`mae`), its position embeddings, presets, the ViT encoder and heads."""
