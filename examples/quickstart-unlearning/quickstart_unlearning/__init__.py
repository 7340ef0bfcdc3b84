"""Quickstart: a Flower app on scikit-learn's digits whose client 0 asks to be forgotten."""
