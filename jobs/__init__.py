"""Ray entrypoints (glue only): prepare_data, caption, train, upscale, evaluate, ablate, demo."""
