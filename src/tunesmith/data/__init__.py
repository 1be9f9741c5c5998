"""Datasets: registry -> readers -> record formats -> conversations -> template rendering -> encoded samples -> batches."""
