"""Recipes: whole pipelines built from oapl's components."""
