"""Datasets: readers, the decode-once loader, preprocessing, ImageNet labels."""
