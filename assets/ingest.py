"""Ingest assets: engagement_logs, entity_metadata (filled by the foundation issue)."""
