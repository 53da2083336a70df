"""Automatic parameter search: the study, its space and scorer, and plan sources for trials."""
