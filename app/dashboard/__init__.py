"""The web dashboard: static pages served by the API, and the read-only endpoints they use."""
