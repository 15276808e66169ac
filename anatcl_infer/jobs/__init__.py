"""Whole-cohort jobs built on every stage: ``embed`` (crash-safe, resumable ``anatcl embed``)."""
