"""Objective metrics of the MAGNeT paper and their embedding models in Flax: FAD (VGGish), KL (PaSST labels) and
the CLAP score (LAION-CLAP HTS-AT + RoBERTa)."""
