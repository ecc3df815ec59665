"""Integrations with other frameworks (each imported lazily; they need their optional dependency)."""
