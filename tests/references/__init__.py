"""Saved references of today's numbers (see :mod:`tests.references.cases`)."""
