"""Schema revisions, oldest first: 0001 records, 0002 reviews."""
