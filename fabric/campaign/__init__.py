"""Batch campaigns: a manifest plus inputs with ``custom_id``s, sharded over sites, resumable,
exactly one result or error line per input (see ``docs/campaigns.md``)."""
