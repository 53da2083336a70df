"""Prompt sets, the template-driven dataset generator and chat templates."""
