"""The DisCo trainer: streaming data from the Parquet triplets, the training loop, checkpoints,
distributed launch through Ray Train (see DESIGN.md and README "Training")."""
