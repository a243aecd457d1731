"""Objective metrics of the MAGNeT paper: FAD (VGGish), KL (PaSST labels) and their embedding models in Flax."""
